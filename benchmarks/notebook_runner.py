"""Execute a numbered notebook's code cells in this Python process, without Jupyter or papermill.

A bare GPU machine has PyTorch and the scientific stack but no papermill, nbformat, ipykernel or
IPython, and nothing can be installed there. :func:`execute_notebook` runs a notebook the way
papermill does, with the notebook's own code as the single source of truth:

* the cell tagged ``parameters`` runs first with its defaults, then an injected cell (tagged
  ``injected-parameters``, as papermill tags it) assigns the given parameters;
* every code cell runs in order in one namespace (``__name__ == "__main__"``), with the working
  directory set to the notebook's folder (papermill's ``cwd``);
* as in a notebook, the value of a cell's last expression is displayed; ``display()`` and
  ``Markdown`` work without IPython (imports made while the notebook runs get a small stand-in,
  :data:`IPYTHON_SHIM`, when IPython cannot be imported; it is kept out of ``sys.modules``);
  ``%matplotlib ...`` lines are skipped (figures are drawn with the Agg backend);
  any other IPython magic or shell escape is an error naming the notebook, cell and line;
* stdout and stderr are shown as they come and kept as each cell's outputs;
* the executed notebook is written as nbformat 4 JSON (plain ``json``), also when a cell fails,
  like papermill's output notebook; the error names the executed notebook and the cell.

Figures are closed after each cell (the inline backend does the same), and the namespace is
dropped after the notebook, so GPU memory held by its models is freed for the next one.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import gc
import io
import json
import os
import sys
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_KEPT_OUTPUT_CHARS = 20_000  # per cell in the executed notebook (the live log has everything)


class NotebookExecutionError(RuntimeError):
    """A cell raised; the message names the executed notebook and the cell, as papermill's does."""


# ----------------------------------------------------------------------------- IPython stand-in


class Markdown:
    """``IPython.display.Markdown`` stand-in: shown as its text."""

    def __init__(self, data: str = ""):
        self.data = data

    def __repr__(self) -> str:
        return self.data


def _shown_text(value: Any) -> str:
    """The text a notebook would show for ``value`` (tables in full width, figures by name)."""
    if type(value).__name__ == "Figure" and hasattr(value, "savefig"):
        return f"<Figure: {len(getattr(value, 'axes', []))} axes>"
    if hasattr(value, "to_string"):  # pandas DataFrame / Series
        try:
            return value.to_string(max_rows=60)
        except TypeError:
            return value.to_string()
    return repr(value)


def display(*values: Any, **_: Any) -> None:
    """``IPython.display.display`` stand-in: prints each value as a notebook would show it."""
    for value in values:
        print(_shown_text(value))


def _make_ipython_shim() -> dict[str, types.ModuleType]:
    package = types.ModuleType("IPython")
    package.__path__ = []  # a package, so ``import IPython.display`` works
    package.get_ipython = lambda: None
    module = types.ModuleType("IPython.display")
    module.display, module.Markdown = display, Markdown
    module.HTML = module.Latex = Markdown
    package.display = module
    return {"IPython": package, "IPython.display": module}


IPYTHON_SHIM = _make_ipython_shim()
_real_import = builtins.__import__


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    """``import``, with IPython's display functions from :data:`IPYTHON_SHIM` when IPython cannot be
    imported. The stand-in is never put in ``sys.modules``, so libraries that look there for IPython
    (matplotlib, tqdm) still see that it is absent."""
    try:
        return _real_import(name, globals, locals, fromlist, level)
    except ImportError:
        if level or name not in IPYTHON_SHIM:
            raise
        return IPYTHON_SHIM[name] if fromlist else IPYTHON_SHIM["IPython"]


@contextlib.contextmanager
def ipython_fallback() -> Iterator[None]:
    """While a notebook runs, ``from IPython.display import display`` works without IPython, in the
    notebook's cells and in the modules they call (e.g. a teaching helper that displays a figure)."""
    builtins.__import__ = _import
    try:
        yield
    finally:
        builtins.__import__ = _real_import


@contextlib.contextmanager
def hidden_modules(names: tuple[str, ...] = ()) -> Iterator[None]:
    """Make ``names`` and their submodules unimportable for the duration (e.g. ``("IPython",
    "ipywidgets")``, to run here as on a machine without them), also when they were imported before."""
    loaded = [m for m in sys.modules if any(m.startswith(f"{name}.") for name in names)]
    saved = {name: sys.modules.get(name, _MISSING) for name in (*names, *loaded)}
    try:
        for name in saved:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
        yield
    finally:
        for name, module in saved.items():
            if module is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_MISSING = object()


# ----------------------------------------------------------------------------- the cells


def cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def strip_magics(source: str, where: str) -> str:
    """``source`` with ``%matplotlib`` lines commented out; any other magic or ``!`` is an error."""
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped[0] not in "%!":
            continue
        if stripped.startswith("%matplotlib"):
            lines[number - 1] = line.replace("%matplotlib", "# %matplotlib (Agg here)", 1)
            continue
        raise NotebookExecutionError(
            f"{where}, line {number}: IPython syntax {stripped.split()[0]!r} cannot run without IPython"
        )
    return "\n".join(lines)


def parameters_source(parameters: dict[str, Any]) -> str:
    """The injected cell: one ``name = value`` line per parameter (``repr`` of plain values)."""
    lines = ["# Parameters (injected)"]
    for name, value in parameters.items():
        if not name.isidentifier():
            raise ValueError(f"parameter name {name!r} is not a Python identifier")
        lines.append(f"{name} = {value!r}")
    return "\n".join(lines) + "\n"


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy (``\\r`` progress updates collapse to their last)."""

    def __init__(self, stream):
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        if self.kept.tell() < MAX_KEPT_OUTPUT_CHARS:
            self.kept.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    def fileno(self) -> int:  # subprocess and faulthandler need a real descriptor
        return self.stream.fileno()

    def text(self) -> str:
        lines = [line.rsplit("\r", 1)[-1] for line in self.kept.getvalue().split("\n")]
        return "\n".join(lines)


def _run_code(source: str, namespace: dict, filename: str) -> Any:
    """Execute ``source``; return the value of its last expression (None if it ends in a statement)."""
    tree = ast.parse(source, filename=filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), namespace)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), filename, "eval"), namespace)


def _close_figures() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


def execute_notebook(
    source: str | os.PathLike,
    output: str | os.PathLike,
    parameters: dict[str, Any],
    cwd: str | os.PathLike | None = None,
    hide_modules: tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
) -> float:
    """Run ``source``'s code cells with ``parameters``; write the executed notebook to ``output``.

    Returns the seconds it took. Raises :class:`NotebookExecutionError` naming ``output`` and the
    failing cell (the executed notebook, with the traceback as the cell's output, is written
    first). ``metadata`` is stored as the executed notebook's ``cxr_provenance``.
    """
    source, output = Path(source), Path(output)
    notebook = json.loads(source.read_text())
    executed = copy.deepcopy(notebook)
    cells = executed["cells"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    injected = {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {"tags": ["injected-parameters"]},
        "outputs": [],
        "source": parameters_source(parameters),
    }
    if notebook.get("nbformat_minor", 0) >= 5:  # cell ids from nbformat 4.5 on
        injected["id"] = "injected-parameters"
    cells.insert(tagged[0] + 1 if tagged else 0, injected)
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    started = time.perf_counter()
    previous_cwd = Path.cwd()
    failure: NotebookExecutionError | None = None
    os.environ.setdefault("MPLBACKEND", "Agg")
    count = 0
    with hidden_modules(hide_modules), ipython_fallback():
        try:
            os.chdir(cwd or source.parent)
            for cell in cells:
                if cell.get("cell_type") != "code":
                    continue
                count += 1
                cell["execution_count"], cell["outputs"] = count, []
                where = f"{output.name}, cell {count}"
                stdout, stderr = _Tee(sys.stdout), _Tee(sys.stderr)
                error = None
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    try:
                        code = strip_magics(cell_source(cell), where)
                        value = _run_code(code, namespace, f"<{source.stem} cell {count}>")
                        if value is not None:
                            cell["outputs"].append(_result(value, count))
                    except Exception as raised:  # the notebook's error, recorded like papermill's
                        error = raised
                        traceback.print_exc()
                    finally:
                        _close_figures()
                cell["outputs"][:0] = _streams(stdout.text(), stderr.text())
                if error is not None:
                    cell["outputs"].append(_error(error))
                    failure = NotebookExecutionError(
                        f"{output.name} failed in cell {count}: {type(error).__name__}: {error}\n"
                        f"  open {output} to see the traceback"
                    )
                    break
        finally:
            os.chdir(previous_cwd)
            seconds = time.perf_counter() - started
            executed.setdefault("metadata", {})["cxr_provenance"] = {
                **(metadata or {}),
                "executed_by": "benchmarks/notebook_runner.py (no papermill)",
                "parameters": parameters,
                "seconds": round(seconds, 1),
                "failed": failure is not None,
            }
            output.parent.mkdir(parents=True, exist_ok=True)
            temporary = output.with_name(output.name + ".tmp")
            temporary.write_text(json.dumps(executed, indent=1, default=str) + "\n")
            temporary.replace(output)
            namespace.clear()
            gc.collect()
            _empty_cuda_cache()
    if failure is not None:
        raise failure
    return seconds


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _streams(stdout: str, stderr: str) -> list[dict]:
    return [
        {"name": name, "output_type": "stream", "text": text}
        for name, text in (("stdout", stdout), ("stderr", stderr))
        if text
    ]


def _result(value: Any, count: int) -> dict:
    return {
        "output_type": "execute_result",
        "execution_count": count,
        "metadata": {},
        "data": {"text/plain": _shown_text(value)[:MAX_KEPT_OUTPUT_CHARS]},
    }


def _error(error: BaseException) -> dict:
    return {
        "output_type": "error",
        "ename": type(error).__name__,
        "evalue": str(error),
        "traceback": traceback.format_exception(error),
    }
