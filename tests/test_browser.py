"""JupyterLab as its users open it: the notebooks run in Chromium, driven by Playwright.

One JupyterLab server, started from this environment with the command ``make lab`` runs
(:func:`cxrlib.pipeline.lab_command`) on 127.0.0.1 with a free port and a random token, serves
copies of the notebooks next to a copy of the session's finished ``smoke`` run.

How the notebooks find that copy: the server's environment, which every kernel inherits,
sets ``CXR_RUNS_DIR``, ``CXR_FIGURES_DIR`` and ``CXR_DATA_DIR`` (read by :mod:`cxrlib.paths`)
to folders of the temporary copy, so the default folders of every preset are there and the
repository's own ``runs/`` and ``figures/`` are never read or written. The notebooks that
read the smoke run get papermill's injected-parameters cell ``preset = "smoke"``, and nothing
else; an unchanged notebook (default preset ``demo``) finds no run and must say in one line
which command makes one.

Chromium is Debian's ``/usr/bin/chromium`` (``CXR_CHROMIUM`` overrides it), launched by
Playwright as its ``executable_path`` with the flags a sandboxed root process needs and a
fresh profile; Playwright's own browser download is never used. Everything started here
(Chromium and its helpers, found by that profile; JupyterLab and its kernels) is stopped by
process id when the module's tests end, failed or not.

Screenshots of each notebook after its run are saved under the module's temporary folder;
with ``CXR_REFRESH_SCREENSHOTS=1`` the screenshot of 09 with its slider moved is also written
to ``docs/images/jupyterlab_09_slider.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from cxrlib import paths
from cxrlib.pipeline import lab_command

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container: Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No connections to Google's services: refused on a closed network, many at a time.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = paths.PROJECT_ROOT / "docs" / "images" / "jupyterlab_09_slider.png"
# JupyterLab settings for a test: every cell in the page (no virtual scrolling), no news toasts.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
KERNEL_TIMEOUT_S = 300  # one notebook's "Run All": 09 takes 30-90 s on 2 shared cores


# ----------------------------------------------------------------------------- processes


def stop_processes(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM every pid, then SIGKILL the ones still running after ``timeout`` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    for pid in pids:
        while _running(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _running(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (JupyterLab's kernels start their own sessions)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def chromium_processes(profile: Path) -> list[int]:
    """Process ids of this process's descendants started with ``profile`` (Chromium and its helpers)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(str(profile) in arg for arg in child.cmdline()):
                found.append(child.pid)
    return found


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition()`` until it returns a true value (returned), or fail naming ``what``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- the lab


@dataclass
class Lab:
    """A JupyterLab server on a copy of the smoke run, and one Chromium page to drive it."""

    base_url: str
    token: str
    root: Path  # the server's root: copies of the notebooks
    screenshots: Path
    page: object  # playwright.sync_api.Page

    def api(self, method: str, path: str):
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def open(self, notebook: str) -> None:
        """Open ``notebook`` (relative to the root) alone, in a reset workspace, and wait for its kernel;
        the kernels of notebooks opened before are shut down first."""
        self.shut_down_kernels()
        self.page.goto(f"{self.base_url}/lab/tree/{notebook}?reset&token={self.token}")
        self.page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
        wait_for(self.kernel_idle, 90, f"the kernel of {notebook} to start")

    def kernel_idle(self) -> bool:
        sessions = self.api("GET", "sessions")
        return bool(sessions) and all(s["kernel"]["execution_state"] == "idle" for s in sessions)

    def menu(self, menu: str, item: str) -> None:
        """Click ``item`` in the menu bar's ``menu``, as a user would."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
        self.page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True).click()

    def run_all(self) -> None:
        """Run > Run All Cells, then wait until no cell is queued or running and the kernel is idle."""
        self.menu("Run", "Run All Cells")
        prompts = self.page.locator(".jp-CodeCell .jp-InputPrompt")

        def finished() -> bool:
            texts = prompts.all_inner_texts()
            return not any("*" in text for text in texts) and any(c.isdigit() for c in "".join(texts))

        wait_for(lambda: finished() and self.kernel_idle(), KERNEL_TIMEOUT_S, "Run All to finish", interval=1)

    def save(self, notebook: str) -> nbformat.NotebookNode:
        """File > Save Notebook, then the notebook as written to disk (outputs included).

        Jupyter writes into the file in place (after a backup copy), so a read can meet it
        half written: it is read again until it is a complete notebook newer than before.
        """
        path = self.root / notebook
        before = path.stat().st_mtime_ns
        self.menu("File", "Save Notebook")

        def saved() -> nbformat.NotebookNode | None:
            if path.stat().st_mtime_ns == before:
                return None
            try:
                return nbformat.read(path, as_version=4)
            except ValueError:  # not (yet) complete JSON
                return None

        return wait_for(saved, 30, f"{notebook} to be saved")

    def screenshot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def shut_down_kernels(self) -> None:
        for session in self.api("GET", "sessions"):
            self.api("DELETE", f"sessions/{session['id']}")


def copy_smoke_run(smoke, root: Path) -> None:
    """The smoke run's folders in the default layout under ``root`` (``runs/smoke``, ``figures/smoke``,
    ``data/phantom-smoke``), without the training checkpoints (the notebooks read ``best_model.pt``)."""
    checkpoints = shutil.ignore_patterns("checkpoint_epoch*")
    shutil.copytree(smoke.run_path, root / "runs" / "smoke", ignore=checkpoints)
    shutil.copytree(smoke.figures_path, root / "figures" / "smoke")
    shutil.copytree(smoke.data_path, root / "data" / "phantom-smoke")


def write_notebook_copies(root: Path) -> None:
    """``smoke/<name>.ipynb``: 04, 06 and 09 with papermill's injected ``preset = "smoke"``;
    ``demo/04_evaluate.ipynb``: unchanged (its default preset, demo, has not run here)."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    (root / "smoke").mkdir(parents=True)
    for name in ("04_evaluate", "06_gradcam", "09_receptive_field_explained"):
        nb = load_notebook_node(str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"))  # as papermill reads it
        nbformat.write(parameterize_notebook(nb, {"preset": "smoke"}), root / "smoke" / f"{name}.ipynb")
    (root / "demo").mkdir()
    shutil.copy(paths.NOTEBOOKS_DIR / "04_evaluate.ipynb", root / "demo" / "04_evaluate.ipynb")


def start_lab(folder: Path, log) -> tuple[subprocess.Popen, str, str]:
    """JupyterLab on ``folder/notebooks`` with the project folders of ``folder``; returns the process,
    its base URL and its token once it answers."""
    for name, settings in LAB_SETTINGS.items():
        path = folder / "jupyter" / "user-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = {
        **os.environ,
        "CXR_RUNS_DIR": str(folder / "runs"),
        "CXR_FIGURES_DIR": str(folder / "figures"),
        "CXR_DATA_DIR": str(folder / "data"),
        # this test's Jupyter and IPython folders: no user's kernels, settings or start-up files
        "JUPYTER_CONFIG_DIR": str(folder / "jupyter" / "config"),
        "JUPYTER_DATA_DIR": str(folder / "jupyter" / "data"),
        "JUPYTER_RUNTIME_DIR": str(folder / "jupyter" / "runtime"),
        "IPYTHONDIR": str(folder / "ipython"),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    extra = [
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--no-browser",
        f"--LabApp.user_settings_dir={folder / 'jupyter' / 'user-settings'}",
        f"--LabApp.workspaces_dir={folder / 'jupyter' / 'workspaces'}",
    ]
    command = lab_command(*extra, root_dir=folder / "notebooks")
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder
    )
    base_url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{base_url}/api/status?token={token}", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(answers, 90, "JupyterLab to answer")
    except BaseException:
        stop_lab(process)
        raise
    return process, base_url, token


def stop_lab(process: subprocess.Popen) -> None:
    """Stop JupyterLab and its kernels by process id."""
    stop_processes([process.pid, *descendants(process.pid)])
    process.wait(15)


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab on a copy of the session's smoke run, and a Chromium page; both stopped at the end."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright (pip install -e .[dev])")
    smoke = request.getfixturevalue("smoke_run")
    folder = tmp_path_factory.mktemp("lab")
    copy_smoke_run(smoke, folder)
    write_notebook_copies(folder / "notebooks")
    screenshots = folder / "screenshots"
    screenshots.mkdir()
    with (folder / "jupyterlab.log").open("wb") as lab_log:
        server, base_url, token = start_lab(folder, lab_log)
        profile, playwright = folder / "chromium-profile", None
        try:
            playwright = sync_api.sync_playwright().start()
            context = playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                args=CHROMIUM_FLAGS,
                headless=True,
                viewport={"width": 1280, "height": 860},
            )
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            yield Lab(base_url, token, folder / "notebooks", screenshots, page)
        finally:
            chromium = chromium_processes(profile)  # found while they are still this process's descendants
            if playwright is not None:
                playwright.stop()
            stop_processes(chromium)
            stop_lab(server)


# ----------------------------------------------------------------------------- the tests


def output_images(lab: Lab):
    """Every ``<img>`` in the notebook's output areas, and how many have loaded."""
    images = lab.page.locator(".jp-OutputArea-output img")
    loaded = images.evaluate_all("els => els.filter(e => e.complete && e.naturalWidth > 0).length")
    return images, loaded


def error_outputs(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"{out.ename}: {out.evalue}"
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.output_type == "error"
    ]


def png_outputs(cells) -> int:
    return sum("image/png" in out.get("data", {}) for cell in cells for out in cell.get("outputs", []))


def has_widget(cell) -> bool:
    return any(WIDGET_VIEW in out.get("data", {}) for out in cell.get("outputs", []))


def test_09_runs_in_jupyterlab_and_its_slider_redraws_the_erf(lab):
    notebook = "smoke/09_receptive_field_explained.ipynb"
    lab.open(notebook)
    lab.run_all()
    saved = lab.save(notebook)
    assert error_outputs(saved) == []
    images, loaded = output_images(lab)
    slider_cells = [cell for cell in saved.cells if has_widget(cell)]
    # the notebook's four figures (the field's growth, a conv stack's ERF, the ERF per size, the
    # phantom's findings), saved with their cells
    assert len(slider_cells) == 1 and png_outputs(c for c in saved.cells if not has_widget(c)) == 4
    # the slider's first figure: kept in the widget's state, or also saved in its cell's outputs when
    # the kernel's output reached the cell before the page's widget took it over
    assert png_outputs(slider_cells) in (0, 1)
    assert images.count() == loaded == 4 + 1  # every figure shown once and loaded, the slider's too

    cell = lab.page.locator(".jp-Notebook .jp-Cell", has=lab.page.locator(".widget-interact")).last
    widget = cell.locator(".widget-interact").last
    handle = widget.locator(".noUi-handle").first
    readout = widget.locator(".widget-readout").first
    figure = cell.locator(".jp-OutputArea-output img").last  # in the widget, or in its cell (see above)
    caption = cell.locator(".jp-RenderedText", has_text=" px: the ERF").last
    widget.scroll_into_view_if_needed()
    before_value, before_image = readout.inner_text(), figure.get_attribute("src")
    assert caption.inner_text().startswith(f"{before_value} px: ")
    lab.screenshot("09_receptive_field_explained")

    handle.focus()
    lab.page.keyboard.press("ArrowLeft")  # a user moving the focused slider one step with the keyboard
    wait_for(lambda: readout.inner_text() != before_value, 20, "the slider to move")
    after_value = readout.inner_text()
    wait_for(
        lambda: (
            caption.inner_text().startswith(f"{after_value} px: ")
            and figure.get_attribute("src") not in (None, before_image)
        ),
        90,
        f"the figure to be redrawn at {after_value} px",
    )
    assert int(after_value) < int(before_value)
    widget.evaluate("el => el.closest('.jp-Cell').scrollIntoView({block: 'start'})")
    path = lab.screenshot("09_receptive_field_explained_slider_moved")
    if os.environ.get("CXR_REFRESH_SCREENSHOTS") == "1":
        shutil.copy(path, DOCS_SCREENSHOT)


@pytest.mark.parametrize("name", ["04_evaluate", "06_gradcam"])
def test_a_smoke_notebook_runs_in_jupyterlab_and_its_figures_render(lab, name):
    notebook = f"smoke/{name}.ipynb"
    lab.open(notebook)
    lab.run_all()
    saved = lab.save(notebook)
    assert error_outputs(saved) == []
    images, loaded = output_images(lab)
    assert png_outputs(saved.cells) >= 1 and images.count() == loaded == png_outputs(saved.cells)
    images.last.scroll_into_view_if_needed()
    lab.screenshot(name)


def test_a_notebook_on_a_preset_not_run_yet_says_in_one_line_what_to_run(lab):
    notebook = "demo/04_evaluate.ipynb"
    lab.open(notebook)
    lab.run_all()
    first = lab.page.locator(".jp-OutputArea-output").first
    text = first.inner_text().strip()
    assert "\n" not in text and "Traceback" not in text, text
    assert text.endswith(
        "runs/demo/index.csv does not exist yet: run python -m cxrlib.pipeline --preset demo "
        "(or notebook 00_data first)"
    ), text
    saved = lab.save(notebook)
    first_output = next(out for cell in saved.cells for out in cell.get("outputs", []))
    assert first_output.output_type == "error" and first_output.traceback == [first_output.evalue]
    first.scroll_into_view_if_needed()
    lab.screenshot("04_evaluate_demo_not_run")
