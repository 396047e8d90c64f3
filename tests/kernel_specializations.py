"""Which compiled variants of our Triton kernels a run would need, recorded under the interpreter.

Triton compiles a kernel once per specialization: its constexpr values, launch options, argument
types, and whether each integer argument equals 1 or is a multiple of 16 and each pointer is
16-byte aligned (unless the kernel opts out with ``do_not_specialize``). On the CPU nothing is
compiled, but every launch goes through ``InterpretedFunction.run``; this records the key a GPU
would compile for, using Triton's own per-argument specialization.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The interpreter switch is read when triton is first imported, which a plugin may do first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

interpreter = pytest.importorskip("triton.runtime.interpreter")
jit = pytest.importorskip("triton.runtime.jit")
compiler = pytest.importorskip("triton.backends.compiler")
if not hasattr(jit, "native_specialize_impl"):
    pytest.skip("this Triton has no native_specialize_impl to key launches with", allow_module_level=True)

Key = tuple[Any, ...]


def specialization_key(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key:
    params = list(inspect.signature(kernel.fn).parameters.values())
    names = [p.name for p in params]
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    not_specialized = set(kernel.kwargs.get("do_not_specialize") or ())
    key: list[Any] = [kernel.fn.__name__]
    for param in params:
        if param.name not in bound:
            continue
        value = bound[param.name]
        if "constexpr" in str(param.annotation):
            key.append((param.name, value))
        else:
            specialize = param.name not in not_specialized
            spec = jit.native_specialize_impl(compiler.BaseBackend, value, False, specialize, True)
            key.append((param.name, spec))
    # Launch options (num_warps, num_stages, launch_pdl, ...) are part of the compiled variant too.
    key.extend(sorted((name, value) for name, value in kwargs.items() if name not in names))
    return tuple(key)


class LaunchRecorder:
    """The distinct specialization keys launched while ``recording``, in first-seen order."""

    def __init__(self) -> None:
        self.keys: dict[Key, None] = {}

    @contextmanager
    def recording(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[LaunchRecorder]:
        run = interpreter.InterpretedFunction.run

        def recorded(kernel: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            self.keys.setdefault(specialization_key(kernel, args, kwargs))
            return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(interpreter.InterpretedFunction, "run", recorded)
            yield self

    def kernels(self) -> set[str]:
        return {key[0] for key in self.keys}


# Loaded as a pytest plugin (``PYTHONPATH=tests python -m pytest -p kernel_specializations ...``),
# this module counts the distinct variants each test file launches: what a GPU run of those
# files compiles, which sizes the device command's time for its kernel tests.
_PER_FILE: dict[str, set[Key]] = {}
_CURRENT_FILE = ["(collection)"]


def pytest_configure(config: pytest.Config) -> None:
    run = interpreter.InterpretedFunction.run

    def counted(kernel: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        _PER_FILE.setdefault(_CURRENT_FILE[0], set()).add(specialization_key(kernel, args, kwargs))
        return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = counted


def pytest_runtest_setup(item: pytest.Item) -> None:
    _CURRENT_FILE[0] = item.path.name


def pytest_terminal_summary(terminalreporter: Any) -> None:
    every: set[Key] = set()
    for name, keys in sorted(_PER_FILE.items()):
        terminalreporter.write_line(f"kernel variants launched by {name}: {len(keys)}")
        every |= keys
    terminalreporter.write_line(f"kernel variants launched in all: {len(every)}")
