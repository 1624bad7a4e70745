"""Hostile inputs: every case in tests/hostile/cases/ gets a one-line message per problem that names the file,
line or field, exit code 2, no traceback (unless --debug), and leaves a previous run's outputs untouched.

A case is a recipe overlaying tests/hostile/base.yaml; its header comments say how to run it:

    # command: check            validate | check | prepare | train
    # expect: <text>            a substring of the error output (one `expect:` per line)
    # accept: <text>            instead of expect: the command must succeed and print <text>
    # args: --set a.b=c         extra command-line arguments
    # setup: chmod000|eio|min-free|no-outputs|data-in-out|symlink-loop|special-files|not-yaml-env
    #                           see `prepare_case`

The corpus runs in-process through `qctrain.cli.main` (one Python start instead of 65 starts of ~10 s each on
this machine); `test_real_entrypoint` runs a case of each command through `python -m qctrain` subprocesses.
"""

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "hostile"
CASES = sorted(CORPUS.glob("cases/*.yaml"))
MAX_LINE = 400  # characters in one error line: values are abbreviated, whatever the input holds


def header(path: Path) -> dict[str, list[str]]:
    spec: dict[str, list[str]] = {}
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        spec.setdefault(key.strip(), []).append(value.strip())
    return spec


def tree_digest(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def previous_run(out: Path) -> None:
    """What a finished run left in output.dir: these files must come through a failed command unchanged."""
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"GOOD ADAPTER " * 100)
    (out / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (out / "run_manifest.json").write_text('{"recipe_sha256": "earlier"}')
    (out / "README.md").write_text("# the card of the earlier run\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from qctrain.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("hostile-model") / "tiny-phi3")


def prepare_case(spec: dict, tmp: Path, model_dir: Path, monkeypatch) -> Path:
    out = tmp / "out"
    setup = set(spec.get("setup", []))
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("QCTRAIN_TEST_MODEL", str(model_dir))
    monkeypatch.setenv("QCTRAIN_TEST_OUT", str(out))
    monkeypatch.setenv("QCTRAIN_TEST_TMP", str(tmp))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QCTRAIN_HOSTILE_UNSET", raising=False)
    if "no-outputs" not in setup:
        previous_run(out)
    if "chmod000" in setup:
        if os.geteuid() == 0:
            pytest.skip("root reads a chmod 000 file anyway; unreadable-eio covers a failing read for root")
        (tmp / "unreadable.jsonl").write_text((CORPUS / "data" / "good.jsonl").read_text())
        (tmp / "unreadable.jsonl").chmod(0)
    if "eio" in setup:
        # A file whose every read fails (EIO) even for root: /proc/self/mem at offset 0 is unmapped.
        os.symlink("/proc/self/mem", tmp / "unreadable.jsonl")
    if "data-in-out" in setup:  # a data folder inside output.dir (cases put output.dir around or in it)
        (out / "data").mkdir(parents=True)
        (out / "data" / "good.jsonl").write_text((CORPUS / "data" / "good.jsonl").read_text())
    if "symlink-loop" in setup:  # a link to itself, alone and inside a data folder
        os.symlink(tmp / "loop.jsonl", tmp / "loop.jsonl")
        (tmp / "loops").mkdir()
        (tmp / "loops" / "good.jsonl").write_text((CORPUS / "data" / "good.jsonl").read_text())
        os.symlink(tmp / "loops" / "loop.jsonl", tmp / "loops" / "loop.jsonl")
    if "special-files" in setup:  # a FIFO and a link to /dev/zero named like data, each beside a good file
        for folder in ("specials", "zeros"):
            (tmp / folder).mkdir()
            (tmp / folder / "good.jsonl").write_text((CORPUS / "data" / "good.jsonl").read_text())
        os.mkfifo(tmp / "specials" / "pipe.jsonl")
        os.symlink("/dev/zero", tmp / "zeros" / "zero.jsonl")
    if "not-yaml-env" in setup:
        monkeypatch.setenv("QCTRAIN_TEST_NOT_YAML", "[unclosed: {")
    if "min-free" in setup:
        monkeypatch.setenv("QCTRAIN_MIN_FREE_BYTES", str(1 << 60))  # an exbibyte: no disk has that free
    return out


def run_case(case: Path, spec: dict, *extra: str) -> list[str]:
    [command] = spec.get("command", ["check"])
    args = [a for line in spec.get("args", []) for a in shlex.split(line)]
    return [command, str(case.relative_to(REPO)), *args, *extra]


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_hostile_case(case, tmp_path, model_dir, monkeypatch, capsys):
    from qctrain.cli import main

    spec = header(case)
    out = prepare_case(spec, tmp_path, model_dir, monkeypatch)
    before = tree_digest(out)
    code = main(run_case(case, spec))
    captured = capsys.readouterr()
    if "accept" in spec:
        assert code == 0, captured.err
        for text in spec["accept"]:
            assert text in captured.out, captured.out
        return
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert lines and all(line.startswith("qctrain: error: ") for line in lines), captured.err
    assert "Traceback" not in captured.err
    assert all(len(line) <= MAX_LINE for line in lines), max(lines, key=len)[:1000]
    for text in spec["expect"]:
        assert any(text in line for line in lines), f"{text!r} not in:\n{captured.err}"
    assert tree_digest(out) == before  # a failed command leaves the earlier run's outputs alone


def test_corpus_is_complete():
    """Every corpus case says what it expects; every data file is used by some case."""
    assert len(CASES) >= 60
    for case in CASES:
        spec = header(case)
        assert spec.get("command", ["check"])[0] in {"validate", "check", "prepare", "train"}, case
        assert "expect" in spec or "accept" in spec, case
    used = "".join(case.read_text(encoding="utf-8", errors="replace") for case in CASES)
    for data in (CORPUS / "data").iterdir():
        assert f"tests/hostile/data/{data.name}" in used, f"{data.name} is used by no case"


@pytest.mark.parametrize("name", ["yaml-alias-bomb", "yaml-alias-bomb-seed", "yaml-alias-loop"])
def test_yaml_alias_bombs_are_refused_within_a_second(name, tmp_path, model_dir, monkeypatch, capsys):
    """A kilobyte of YAML whose aliases stand for billions of values (or for themselves): refused before
    anything walks the document."""
    import time

    from qctrain.cli import main

    case = CORPUS / "cases" / f"{name}.yaml"
    assert case.stat().st_size < 1500
    spec = header(case)
    prepare_case(spec, tmp_path, model_dir, monkeypatch)
    started = time.perf_counter()
    assert main(run_case(case, spec)) == 2
    assert time.perf_counter() - started < 1.0
    assert len(capsys.readouterr().err) < MAX_LINE


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path, model_dir, monkeypatch, capsys):
    from qctrain.cli import main

    case = CORPUS / "cases" / "invalid-jsonl.yaml"
    spec = header(case)
    prepare_case(spec, tmp_path, model_dir, monkeypatch)
    argv = ["--debug", *run_case(case, spec)] if where == "before" else [*run_case(case, spec), "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "qctrain: error: " in err


# Through the real entry point, `python -m qctrain` (each start costs ~10 s of imports here, so two, side by
# side): a recipe problem (`validate`) and a data problem found by `train` after its preflight passed. The exit
# status of the process, and nothing on stderr but the error lines (no traceback, no library warnings).
REAL = {"unknown-train-key": "validate", "invalid-jsonl": "train"}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, model_dir) -> dict:
    started = {}
    for name, command in REAL.items():
        case = CORPUS / "cases" / f"{name}.yaml"
        spec = {**header(case), "command": [command]}
        tmp = tmp_path_factory.mktemp(name)
        out = tmp / "out"
        previous_run(out)
        env = {**os.environ, "PYTHONPATH": str(REPO / "entrypoint"), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "QCTRAIN_TEST_MODEL": str(model_dir), "QCTRAIN_TEST_OUT": str(out),
               "QCTRAIN_TEST_TMP": str(tmp)}
        proc = subprocess.Popen([sys.executable, "-m", "qctrain", *run_case(case, spec)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[name] = (proc, spec, out, tree_digest(out))
    results = {}
    for name, (proc, spec, out, before) in started.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr, spec, tree_digest(out) == before)
    return results


@pytest.mark.parametrize("name", REAL)
def test_real_entrypoint(name, real_runs):
    code, _, stderr, spec, outputs_unchanged = real_runs[name]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines and all(line.startswith("qctrain: error: ") for line in lines), stderr
    assert all(any(text in line for line in lines) for text in spec["expect"]), stderr
    assert outputs_unchanged


def test_output_dir_apart_from_data_in_preflight_and_prepare(tmp_path, model_dir):
    """The same refusal where a Recipe is built without load_recipe (the library path): preflight's checks
    and data.prepare say so before anything is written."""
    from qctrain import data, preflight
    from qctrain.errors import InputError
    from qctrain.recipe import Recipe

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good.jsonl").write_text((CORPUS / "data" / "good.jsonl").read_text())
    for out, relation in ((folder, "is the data source"), (folder / "run", "is inside the data folder"),
                          (tmp_path, "contains the data source")):
        recipe = Recipe.model_validate({"model": {"name": str(model_dir)}, "output": {"dir": str(out)},
                                        "data": {"sources": [{"path": str(folder)}], "eval": None}})
        problems = preflight.run_checks(recipe, env={}, hub=False)
        assert any(relation in p and p.startswith("output.dir: ") for p in problems), problems
        with pytest.raises(InputError, match=relation):
            data.prepare(recipe.data, None, out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "good.jsonl"]


def _hostile_recipes(tmp: Path) -> dict[str, Path]:
    """Recipes (and bases) that used to hang, exhaust memory or print megabytes."""
    big = tmp / "big.yaml"
    with open(big, "wb") as handle:  # 100 MB (sparse: the size is what matters, nothing should read it)
        handle.truncate(100 * 10**6)
    amplified = tmp / "amplified.yaml"  # one 1 KiB anchor, 90,000 aliases: 630 KB standing for 92 MB
    amplified.write_text("model: {name: x}\nx-anchor: &a " + "a" * 1024 + "\nx-list:\n" + "  - *a\n" * 90_000)
    assert 500_000 < amplified.stat().st_size < 1 << 20
    fifo = tmp / "fifo.yaml"
    os.mkfifo(fifo)
    recipes = {"100MB": big, "aliases": amplified, "fifo": fifo, "dev-zero": Path("/dev/zero")}
    for name, base in (("fifo-base", fifo), ("dev-zero-base", Path("/dev/zero"))):
        recipes[name] = tmp / f"{name}.yaml"
        recipes[name].write_text(f"base: {base}\nmodel: {{name: x}}\n")
    return recipes


HOSTILE_RECIPES = {"100MB": "big.yaml: 100,000,000 bytes, more than the limit of 1,048,576",
                   "aliases": "YAML aliases (*name) expand the recipe beyond 2 MiB",
                   "fifo": "fifo.yaml: a FIFO (named pipe), not a regular file",
                   "dev-zero": "/dev/zero: a character device, not a regular file",
                   "fifo-base": "fifo.yaml: a FIFO (named pipe), not a regular file",
                   "dev-zero-base": "/dev/zero: a character device, not a regular file"}


@pytest.mark.parametrize("command", ["validate", "check"])
def test_hostile_recipes_are_refused_in_seconds_with_one_line(command, tmp_path):
    """Through the real entry point, each with a 10 s limit: a hang or a flood fails the test, not the suite."""
    import time

    recipes = _hostile_recipes(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "entrypoint")}
    for name, expected in HOSTILE_RECIPES.items():
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qctrain", command, str(recipes[name])], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=10)
        elapsed = time.perf_counter() - started
        assert proc.returncode == 2, (name, proc.stderr[-500:])
        assert elapsed < 10, (name, elapsed)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("qctrain: error: ") and expected in lines[0], (name, lines)
        assert proc.stdout == "" and len(proc.stderr) < MAX_LINE, name


def test_recipe_size_bounds_apply_to_bases_and_set_values(tmp_path):
    from qctrain.errors import InputError
    from qctrain.recipe import load_recipe

    bomb = "[" + ", ".join(["&a [" + ", ".join(["x" * 100] * 100) + "]"] + ["*a"] * 1000) + "]"
    (tmp_path / "r.yaml").write_text("model: {name: x}\ndata: {sources: [{path: d.json}]}\noutput: {dir: out}\n")
    with pytest.raises(InputError, match=r"--set train.x: YAML aliases \(\*name\) expand the recipe beyond"):
        load_recipe(tmp_path / "r.yaml", [f"train.x={bomb}"], env={})
    refs = "\n".join(f"  k{i}: ${{BIG}}" for i in range(100))  # 100 references to a 64 KiB variable
    (tmp_path / "refs.yaml").write_text(f"base: r.yaml\ntrain:\n  lr_scheduler_kwargs:\n{refs}\n")
    with pytest.raises(InputError, match=r"\$\{VAR\} values make the recipe larger than 2 MiB"):
        load_recipe(tmp_path / "refs.yaml", env={"BIG": "x" * (64 << 10)})


def test_error_output_is_capped(tmp_path, capsys):
    """Ten thousand problems are one mistake: 50 lines and a count, each line at most 300 characters."""
    from qctrain.cli import MAX_ERROR_CHARS, MAX_ERROR_LINES, main

    keys = "\n".join(f"  unknown_{i}: 1" for i in range(10_000))
    recipe = tmp_path / ("d" * 200) / ("e" * 200) / "r.yaml"  # every line names it: longer than a line may be
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"model: {{name: x}}\ndata: {{sources: [{{path: d.json}}]}}\noutput: {{dir: out}}\n"
                      f"lora:\n{keys}\n")
    assert main(["validate", str(recipe)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == MAX_ERROR_LINES + 1 and lines[-1] == "qctrain: error: ... and 9950 more problems"
    assert all(len(line) <= len("qctrain: error: ") + MAX_ERROR_CHARS for line in lines)
    assert any(line.endswith("…") for line in lines)  # the long ones were cut


def test_overlong_jsonl_line_is_a_bad_record_and_csv_line_an_error(tmp_path, monkeypatch):
    from qctrain.data import sources
    from qctrain.errors import InputError

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1000)
    good = '{"instruction": "hi", "output": "ho"}\n'
    (tmp_path / "d.jsonl").write_text(good + '{"instruction": "' + "x" * 5000 + '"}\n' + good + "y" * 3000)
    records = list(sources.read_file(tmp_path / "d.jsonl"))
    assert [(r.where.rsplit(":", 1)[1], r.problem is not None) for r in records] == [
        ("1", False), ("2", True), ("3", False), ("4", True)]
    assert records[1].problem.startswith("line longer than") and records[2].raw == good.strip().encode()
    (tmp_path / "d.csv").write_text("instruction,output\nhi,ho\n" + "z" * 2000 + ",b\n")
    with pytest.raises(InputError, match=r"d.csv:3: line longer than"):
        list(sources.read_file(tmp_path / "d.csv"))


def test_long_csv_fields_within_the_line_cap_are_read(tmp_path):
    """csv's own limit (128 KiB a field) no longer ends in an internal error."""
    from qctrain.data import sources

    (tmp_path / "d.csv").write_text("instruction,output\n" + "a" * 300_000 + ",b\n")
    [record] = sources.read_file(tmp_path / "d.csv")
    assert len(record.fields["instruction"]) == 300_000
