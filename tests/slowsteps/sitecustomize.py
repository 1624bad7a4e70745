"""Slow steps for tests: put this folder first on PYTHONPATH and every Python process started with that
environment sleeps QCTRAIN_TEST_STEP_DELAY seconds after each optimizer step (qctrain.train's
PreemptionCallback.on_step_end, patched as the module is imported), so that a signal or a second command
lands while training runs, and a waiting run leaves the cores to the others. Test-only: the product has no
switch for it."""

import importlib.abc
import importlib.util
import os
import sys
import time

_DELAY = float(os.environ.get("QCTRAIN_TEST_STEP_DELAY") or 0)


class _SlowSteps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "qctrain.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            step_end = module.PreemptionCallback.on_step_end

            def slow_step_end(self, *args, **kwargs):
                time.sleep(_DELAY)
                return step_end(self, *args, **kwargs)
            module.PreemptionCallback.on_step_end = slow_step_end
        spec.loader.exec_module = exec_module
        return spec


if _DELAY:
    sys.meta_path.insert(0, _SlowSteps())
