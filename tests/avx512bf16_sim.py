"""Make bitsandbytes believe this CPU has AVX512-BF16 (`install()` before bitsandbytes is imported).

bitsandbytes 0.50.2 asks its native library `has_avx512bf16_cpu()`; on such CPUs it (a) tries to fetch
a kernel from the Hub at import and logs a warning when it cannot, (b) lets Linear4bit repack its
weight on eval-mode forwards. Answering True here takes both paths on any CPU, so CI catches them on
machines without the instructions. Only the flag is faked: code that would run the BF16 instructions
themselves (bf16 gemv at inference) must stay off the tested path.
"""

import importlib.abc
import importlib.util
import sys


class _SayAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.lib.has_avx512bf16_cpu = lambda: True

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "bitsandbytes" in sys.modules:
        raise RuntimeError("install() must run before bitsandbytes is imported")
    sys.meta_path.insert(0, _SayAvx512Bf16())


if __name__ == "__main__":  # python tests/avx512bf16_sim.py ARGS...: the qctrain CLI on a "BF16" CPU
    install()
    from qctrain.cli import main

    sys.exit(main(sys.argv[1:]))
