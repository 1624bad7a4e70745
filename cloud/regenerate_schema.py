"""Regenerate tests/data/skypilot/schemas.json from an installed SkyPilot, and check cloud/qctrain.sky.yaml with
SkyPilot's own loader (Task.from_yaml_config: the schemas plus what it checks in code).

    python -m venv /tmp/sky && /tmp/sky/bin/pip install skypilot==0.14.1
    /tmp/sky/bin/python cloud/regenerate_schema.py        # from the repository root

The tests validate the task offline against the vendored schemas (SkyPilot is too heavy to install for
them). SkyPilot is Apache-2.0 licensed; its schemas come from sky/utils/schemas.py.
"""

import json
import sys
from importlib.metadata import metadata, version
from pathlib import Path

import yaml
from sky import Task
from sky.utils import schemas

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "skypilot" / "schemas.json"
TASK = ROOT / "cloud" / "qctrain.sky.yaml"


def main() -> int:
    meta = metadata("skypilot")
    vendored = {
        "skypilot_version": version("skypilot"),
        "license": meta.get("License") or meta.get("License-Expression"),
        "source": "sky/utils/schemas.py: get_task_schema(), get_resources_schema(), get_storage_schema()",
        "regenerate": "python cloud/regenerate_schema.py (with skypilot installed)",
        "task": schemas.get_task_schema(),
        "resources": schemas.get_resources_schema(),
        "storage": schemas.get_storage_schema(),
    }
    OUT.write_text(json.dumps(vendored, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    task = Task.from_yaml_config(yaml.safe_load(TASK.read_text(encoding="utf-8")),
                                 env_overrides=[("OUTPUT_BUCKET", "qctrain-schema-check")])
    print(f"wrote {OUT.relative_to(ROOT)} (SkyPilot {vendored['skypilot_version']}); "
          f"{TASK.relative_to(ROOT)} loads: {len(task.resources)} resource choices, "
          f"storage mounts {sorted(task.storage_mounts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
