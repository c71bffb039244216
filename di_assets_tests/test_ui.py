"""The Dagster UI, driven in a real browser: Debian's Chromium through Selenium and chromedriver.

`dagster dev` runs as the README starts it (workspace.yaml, the project's dagster.yaml) on a free
port, in a temporary DAGSTER_HOME, on the embedded default (tiny models, two example classes, two
shifts). The class partitions are added through the Python API, as the sensor would add them;
everything after that is clicks: one class's token, a backfill of every class's token, the encoder
root, then one class x shift partition of counterfactuals, each waited for in the UI. GraphQL is
only read, at the end, to confirm what the UI showed.

Screenshots go to $DI_ASSETS_UI_SCREENSHOTS (default: a temporary folder; the paths are printed).
Without chromium and chromedriver the test is skipped, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from di_assets_tests.conftest import copy_classes

pytestmark = [pytest.mark.slow, pytest.mark.ui]

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ["class_images", "class_token", "encoder_root", "counterfactuals", "clip_scores", "scores_db", "diagnosis"]
GROUPS = ["interface", "counterfactuals", "metrics", "diagnosis"]
KINDS = ["PyTorch", "Parquet", "DuckDB"]
CLASSES = ["circle", "square"]
NUM_SAMPLES = 2
CHROME_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    # Twice the pixels, so that the small text of the graph's nodes stays readable in the screenshots.
    "--force-device-scale-factor=2",
]
RUN_TIMEOUT = 150  # seconds for one run (or backfill) to finish; the tiny models take a few


def _unavailable(why: str):
    """No browser: a clear failure under CI, a skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}; the UI test needs it in CI (`bash scripts/test_tools.sh` installs chromium and chromium-driver)",
                    pytrace=False)
    pytest.skip(f"{why} (`bash scripts/test_tools.sh` installs it)")


def _browser_paths() -> tuple[str, str]:
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser:
        _unavailable("Chromium is not installed (Debian package `chromium`)")
    if not driver:
        _unavailable("chromedriver is not installed (Debian package `chromium-driver`)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("the Python package selenium is not installed (the `dev` extra)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"]


LOCATION_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries {
  name locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


class DagsterDev:
    """`dagster dev` in its own process group, with its output in a log file."""

    def __init__(self, env: dict, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml",
               "-h", "127.0.0.1", "-p", str(self.port)]
        # SIGINT back at its default (a shell starts background jobs with it ignored, and dagster dev stops
        # cleanly only on Ctrl-C), and a session of its own, so that stop() reaches every process it starts.
        reset_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.argv[1], sys.argv[1:])")
        self.proc = subprocess.Popen([sys.executable, "-c", reset_sigint, *cmd], cwd=ROOT, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 120) -> None:
        """The webserver answers and the code location has loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                urllib.request.urlopen(f"{self.url}/server_info", timeout=5).read()
                entries = _graphql(self.url, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
                loaded = [e["locationOrLoadError"] for e in entries if e["name"] == "di_assets"]
                if loaded and loaded[0] and loaded[0]["__typename"] == "PythonError":
                    raise AssertionError(f"the code location failed to load: {loaded[0]['message']}")
                if loaded and loaded[0]:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"dagster dev did not come up in {timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """Ctrl-C to the whole process group (webserver, daemon, code servers, runs); SIGKILL if it lingers."""
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not self._group_alive():
                    return
                time.sleep(0.5)
        self.proc.wait(timeout=10)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory, tiny_cache):
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    # The project's instance settings (the `gpu` pool); no telemetry from a test run.
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text() + "\ntelemetry:\n  enabled: false\n")
    copy_classes(tmp / "data", CLASSES)
    config = tmp / "di_assets.yaml"
    config.write_text(f"dataset: {tmp / 'data'}\nstorage: {tmp / 'store'}\nshifts: [base, at_night]\n"
                      f"textual_inversion: {{steps: 10}}\ngeneration: {{num_samples: {NUM_SAMPLES}}}\n")

    # Set-up, not the action under test: the class partitions, as class_folders_sensor would add them.
    import dagster as dg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("classes", CLASSES)

    env = {**os.environ, "DAGSTER_HOME": str(home), "DI_ASSETS_CONFIG": str(config),
           "DI_ASSETS_CACHE": str(tiny_cache)}
    for var in ("DI_ASSETS_STORAGE", "DI_ASSETS_EXECUTOR"):  # this test wants the defaults
        env.pop(var, None)
    server = DagsterDev(env, tmp / "dagster_dev.log")
    try:
        server.wait_ready()
        server.store = tmp / "store"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("DI_ASSETS_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("ui_screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    return _browser_paths()


@pytest.fixture(scope="module")
def ui(browser_paths, dagster_ui, screenshots, tmp_path_factory):  # no browser: skip before starting the server
    browser, driver_path = browser_paths
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path_factory.getbasetemp())
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1600,900")
    # An explicit driver path: selenium-manager never runs, so nothing looks for (or downloads) a driver or browser.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield UI(driver, dagster_ui, screenshots)
    finally:
        driver.quit()


class UI:
    """What a user does in the Dagster UI, one method per gesture, with explicit waits."""

    def __init__(self, driver, server: DagsterDev, screenshots: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.server, self.dir = driver, server, screenshots
        self.By, self.Wait = By, WebDriverWait
        self.shots: list[Path] = []

    # -- looking -------------------------------------------------------------------------------
    def open(self, path: str) -> None:
        self.d.get(self.server.url + path)
        self.wait(lambda: self.text().strip(), 60, f"{path} stayed blank")
        self.skip_greeting()

    def skip_greeting(self) -> None:
        # The first visit greets with a "Join the Dagster community" dialog: skip it.
        for button in self.visible("//button[normalize-space()='Skip']"):
            button.click()

    def resize(self, width: int, height: int) -> None:
        """Make the page itself (not the window around it) width x height CSS pixels."""
        dw, dh = self.d.execute_script(
            "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]")
        self.d.set_window_size(width + dw, height + dh)

    def text(self) -> str:
        return self.d.find_element(self.By.TAG_NAME, "body").text

    def visible(self, xpath: str):
        return [e for e in self.d.find_elements(self.By.XPATH, xpath) if e.is_displayed()]

    def wait(self, predicate, timeout: float, message: str):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException

        try:  # (React re-renders the page under us: a stale element means "look again")
            return self.Wait(self.d, timeout, poll_frequency=0.5,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: predicate())
        except TimeoutException:
            path = self.shot("timeout")
            raise AssertionError(f"{message} (after {timeout:.0f}s; screenshot {path})\n"
                                 f"page text:\n{self.text()[:2000]}\n\ndagster dev log:\n{self.server.tail()}") from None

    def wait_for_text(self, text: str, timeout: float = 30, where: str = "//body"):
        return self.wait(lambda: any(text.lower() in (e.get_attribute("textContent") or "").lower()
                                     for e in self.d.find_elements(self.By.XPATH, where)),
                         timeout, f"{text!r} did not appear")

    def element(self, xpath: str, timeout: float = 30, what: str | None = None):
        found = self.wait(lambda: self.visible(xpath), timeout, f"{what or xpath} did not appear")
        return found[0]

    def shot(self, name: str, crop=None) -> Path:
        """Save a screenshot; crop=(left, top, right, bottom) in CSS pixels keeps only that box."""
        path = self.dir / f"{len(self.shots) + 1:02d}-{name}.png"
        self.dismiss_newsletter()
        self.d.save_screenshot(str(path))
        if crop:
            from PIL import Image

            with Image.open(path) as im:
                scale = im.width / self.d.execute_script("return window.innerWidth")
                box = [max(0, round(v * scale)) for v in crop]
                im.crop((box[0], box[1], min(im.width, box[2]), min(im.height, box[3]))).save(path, optimize=True)
        self.shots.append(path)
        print(f"screenshot: {path}")
        return path

    # -- doing ---------------------------------------------------------------------------------
    def click(self, xpath: str, what: str | None = None) -> None:
        from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

        try:
            self.element(xpath, what=what).click()
        except (ElementClickInterceptedException, StaleElementReferenceException):
            self.skip_greeting()  # the greeting dialog came up late, or the page re-rendered: once more
            self.element(xpath, what=what).click()

    def button(self, label: str, within: str = "") -> str:
        return f"{within}//button[normalize-space()='{label}']"

    def materialize_button(self, timeout: float = 60):
        # "Materialize" for an unpartitioned asset, "Materialize…" (opens a dialog) for a partitioned one
        return self.element("//button[starts-with(normalize-space(), 'Materialize')]", timeout,
                            "the Materialize button")

    DIALOG = "//*[@role='dialog']"
    PICKER_OPEN = "//input[@placeholder='Filter partitions']"  # the partition picker's filter, shown while it is open

    def dismiss_newsletter(self) -> None:
        """Dagster's own "Join the Dagster community" dialog covers the page on a new instance: Skip it."""
        skip = self.d.find_elements(self.By.XPATH, "//*[contains(normalize-space(), 'Join the Dagster community')]"
                                                   "/ancestor::*[@role='dialog'][1]//button[normalize-space()='Skip']")
        if skip:
            skip[0].click()
            self.wait(lambda: not self.d.find_elements(
                self.By.XPATH, "//*[normalize-space(text())='Join the Dagster community']"), 10, "the dialog stays")

    def close_dialog(self) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        ActionChains(self.d).send_keys(Keys.ESCAPE).perform()
        self.wait(lambda: not self.d.find_elements(self.By.CSS_SELECTOR, "[role='dialog']"), 10, "a dialog stays open")

    def pick_partition(self, key: str) -> None:
        """Open the first empty partition picker of the launch dialog and tick `key`."""
        picker = f"{self.DIALOG}//*[normalize-space(text())='Select a partition or create one']"
        self.click(picker, "a partition picker")
        option = f"//input[@type='checkbox']/following::span[normalize-space(text())='{key}']"
        def tick() -> bool:  # found and clicked in one go: the list re-renders while partitions load
            found = self.visible(option)
            if found:
                found[-1].click()  # a stale element raises, and `wait` looks again
            elif not self.visible(self.PICKER_OPEN):  # the dialog re-rendered and closed the picker: open it again
                for closed in self.visible(picker)[:1]:
                    closed.click()
            return bool(found)

        self.wait(tick, 30, f"partition {key!r} is not in the picker")
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        ActionChains(self.d).send_keys(Keys.ESCAPE).perform()  # closes the picker, not the dialog
        self.wait(lambda: not self.visible(self.PICKER_OPEN), 10, "the picker stayed open")

    def launch(self, label: str) -> str:
        """Click the dialog's launch button; return the page that the "View" link of the toast opens."""
        self.click(self.button(label, self.DIALOG), f"the {label!r} button")
        link = self.element("//a[normalize-space()='View']", 60, "the 'Launched run' / 'Created backfill' toast")
        return link.get_attribute("href")

    def wait_for_run(self, href: str, what: str) -> None:
        """Open a run's page and wait for its status tag: Success (or fail on Failure/Canceled)."""
        self.d.get(href)
        ended = " | ".join(f"//*[normalize-space(text())='{s}']" for s in ("Success", "Failure", "Canceled"))
        tag = self.wait(lambda: self.visible(ended), RUN_TIMEOUT, f"the run of {what} did not end")[0].text
        self.shot(f"run-{what}")
        assert tag == "Success", f"the run of {what} ended with {tag}:\n{self.server.tail()}"

    def wait_for_backfill(self, href: str, what: str) -> None:
        """Open a backfill's page and wait for its status: Succeeded."""
        self.d.get(href)
        import re

        def ended():
            m = re.search(r"Status\s+(Succeeded|Completed with failures|Completed|Failed|Canceled)\b", self.text())
            return m and m.group(1)

        status = self.wait(ended, RUN_TIMEOUT + 60, f"the backfill of {what} did not end")
        self.shot(f"backfill-{what}")
        assert status in ("Succeeded", "Completed"), f"the backfill of {what} ended {status}:\n{self.server.tail()}"

    def graph_nodes(self) -> str:
        return " ".join(self.d.execute_script(
            "return Array.from(document.querySelectorAll('svg foreignObject')).map(e => e.textContent)"))

    def expand_all_groups(self) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.wait(lambda: all(g in self.graph_nodes() for g in GROUPS), 60, "the asset groups are not in the graph")
        if "class_token" not in self.graph_nodes():  # collapsed (the browser remembers the last state)
            # The graph's own shortcut for its context-menu item "Expand all groups (⌥E)".
            ActionChains(self.d).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()


def graph_box(ui: UI, pad: int = 32):
    """The CSS-pixel box around everything drawn in the graph (its nodes and group frames)."""
    rects = ui.d.execute_script("""return Array.from(document.querySelectorAll('svg foreignObject'))
        .map(e => e.getBoundingClientRect()).filter(r => r.width > 0)
        .map(r => [r.left, r.top, r.right, r.bottom]);""")
    assert rects, "no graph node found"
    return (min(r[0] for r in rects) - pad, min(r[1] for r in rects) - pad,
            max(r[2] for r in rects) + pad, max(r[3] for r in rects) + pad)


def show_whole_graph(ui: UI) -> None:
    """The global lineage with every group open, wide enough that the nodes show their details."""
    ui.resize(3000, 1300)  # eleven assets in four groups: wide enough that each node shows its kinds
    ui.open("/asset-groups")
    ui.expand_all_groups()
    ui.wait(lambda: all(name in ui.graph_nodes() for name in ASSETS), 30, "an asset is missing from the graph")


def test_asset_graph_shows_the_whole_lineage(ui):
    show_whole_graph(ui)
    nodes = ui.graph_nodes()
    for name in ASSETS + GROUPS + KINDS:
        assert name in nodes, f"{name} is not in the asset graph"
    ui.shot("asset-graph", crop=graph_box(ui))
    # Descriptions are on each asset's page and in the catalog.
    ui.resize(1600, 900)
    ui.open("/assets")
    ui.wait_for_text("One learned token per class", 60)
    assert "images/<class>/<shift>/<seed>.png" in ui.text()
    ui.shot("catalog")


def test_materialize_from_the_ui(ui, dagster_ui):
    ui.resize(1600, 900)

    # 1. One class's token: the Materialize… dialog, one partition picked.
    ui.open("/assets/class_token")
    ui.wait_for_text("One learned token per class", 60)
    assert "tokens/<class>/learned_embeds.safetensors" in ui.text()  # the description, not eaten as HTML
    ui.materialize_button().click()
    ui.element(f"{ui.DIALOG}//*[contains(normalize-space(), 'Launch runs to materialize class_token')]",
               what="the launch dialog")
    ui.pick_partition("circle")
    ui.wait_for_text("1 partition", where=ui.DIALOG)
    ui.shot("class_token-dialog")
    ui.wait_for_run(ui.launch("Launch 1 run"), "class_token-circle")
    assert (dagster_ui.store / "tokens" / "circle" / "learned_embeds.safetensors").is_file()

    # 2. A backfill of every partition of class_token (the encoder root needs every class's token).
    ui.open("/assets/class_token")
    ui.materialize_button().click()
    ui.click(ui.button("All", ui.DIALOG), "the 'All' partitions button")
    ui.wait_for_text(f"{len(CLASSES)} partitions", where=ui.DIALOG)
    ui.wait_for_backfill(ui.launch("Launch backfill"), "class_token-all")
    assert all((dagster_ui.store / "tokens" / c / "learned_embeds.safetensors").is_file() for c in CLASSES)

    # 3. The encoder root: unpartitioned, so the button launches at once.
    ui.open("/assets/encoder_root")
    ui.wait_for_text("tokens.json with every class token", 60)
    button = ui.materialize_button()
    assert button.text.strip() == "Materialize"
    button.click()
    ui.wait_for_run(ui.element("//a[normalize-space()='View']", 60, "the 'Launched run' toast").get_attribute("href"),
                    "encoder_root")

    # 4. One class x shift partition of counterfactuals: a key in each dimension of the dialog.
    ui.open("/assets/counterfactuals")
    ui.wait_for_text("Generated images", 60)
    ui.materialize_button().click()
    ui.element(f"{ui.DIALOG}//*[contains(normalize-space(), 'Launch runs to materialize counterfactuals')]",
               what="the launch dialog")
    ui.pick_partition("circle")   # the class dimension
    ui.pick_partition("at_night")  # the shift dimension
    ui.wait_for_text("1 partition", where=ui.DIALOG)
    ui.shot("counterfactuals-dialog")
    ui.wait_for_run(ui.launch("Launch 1 run"), "counterfactuals-circle-at_night")

    # 5. The asset page: the partition and its own record: its prompt, count and the preview file
    # beside its images (linked: no image bytes in Dagster's history).
    ui.open("/assets/counterfactuals")
    ui.wait_for_text("circle|at_night", 60)
    ui.element("//td[normalize-space()='preview'] | //*[normalize-space(text())='preview']", 30,
               "the preview metadata row")
    text = ui.text()
    assert "a photo of a <TOKEN> at night" in text and "images/circle/at_night/preview.jpg" in text
    assert "base64" not in ui.d.page_source
    from PIL import Image

    preview = Image.open(dagster_ui.store / "images" / "circle" / "at_night" / "preview.jpg")
    assert preview.width >= NUM_SAMPLES * 128  # one cell per sample
    ui.shot("counterfactuals-asset")

    # 6. The asset check's result, on the Checks tab.
    ui.open("/assets/counterfactuals?view=checks")
    ui.wait_for_text("has_expected_image_count", 60)
    ui.wait_for_text("Passed", 60)
    ui.shot("counterfactuals-checks")

    # 7. A blocking check, partitioned by class: class_token's, with the circle partition's result.
    ui.open("/assets/class_token?view=checks")
    ui.wait_for_text("token_is_finite_with_sane_norm", 60)
    ui.wait_for_text("Passed", 60)
    assert "Blocking" in ui.text() or "blocking" in ui.text()
    ui.shot("class_token-blocking-check")

    # 8. The scores of the one partition, then the DuckDB views over them.
    ui.open("/assets/clip_scores")
    ui.wait_for_text("Scores in Hive layout", 60)
    ui.materialize_button().click()
    ui.element(f"{ui.DIALOG}//*[contains(normalize-space(), 'Launch runs to materialize clip_scores')]",
               what="the launch dialog")
    ui.pick_partition("circle")
    ui.pick_partition("at_night")
    ui.wait_for_text("1 partition", where=ui.DIALOG)
    ui.wait_for_run(ui.launch("Launch 1 run"), "clip_scores-circle-at_night")
    ui.open("/assets/scores_db")
    ui.wait_for_text("DuckDB views", 60)
    ui.materialize_button().click()
    ui.wait_for_run(ui.element("//a[normalize-space()='View']", 60, "the 'Launched run' toast").get_attribute("href"),
                    "scores_db")

    # 9. scores_db's page: the per-shift table (with its column schema) and the score chart.
    ui.open("/assets/scores_db")
    ui.wait_for_text("per_shift", 60)
    row = ui.element("//*[normalize-space(text())='per_shift']/ancestor::tr[1]", 30, "per_shift's row")
    ui.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    assert "kept_fraction" in row.text and "at_night" in row.text  # a table, shown inline
    ui.shot("scores_db-per-shift")
    ui.click("//*[normalize-space(text())='scores_per_shift']/following::*[normalize-space(text())='[Show Markdown]'][1]",
             "the chart's [Show Markdown] link")
    chart = ui.wait(lambda: [i for i in ui.d.find_elements(ui.By.CSS_SELECTOR, "[role='dialog'] img")
                             if (i.get_attribute("src") or "").startswith("data:image/png")
                             and ui.d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 600", i)],
                    30, "the score chart did not render")
    assert len(chart) == 1
    ui.shot("scores_db-chart")
    ui.close_dialog()

    # 10. clip_scores' partition: its own numbers (the Plots tab draws them across partitions) and,
    # when the filter dropped some, the file that shows them with their scores and reasons.
    ui.open("/assets/clip_scores")
    ui.wait_for_text("mean_sim_class", 60)
    text = ui.text()
    assert "circle|at_night" in text and "kept_fraction" in text and "a photo at night" in text
    if "dropped_preview" in text:
        assert "scores/class=circle/shift=at_night/dropped.jpg" in text
    row = ui.element("//*[normalize-space(text())='mean_sim_class']/ancestor::tr[1]", 30, "mean_sim_class's row")
    ui.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    ui.shot("clip_scores-partition")

    # The graph afterwards: the materialized assets in green.
    show_whole_graph(ui)
    ui.wait(lambda: "Materialized" in ui.graph_nodes(), 30, "encoder_root does not show as materialized")
    ui.shot("asset-graph-after", crop=graph_box(ui))

    # Read-only confirmation of what the UI showed: exactly the four launched runs, all successful.
    runs = _graphql(dagster_ui.url, "{ runsOrError { ... on Runs { results { status assetSelection { path } } } } }")
    runs = runs["runsOrError"]["results"]
    assert sorted(r["status"] for r in runs) == ["SUCCESS"] * 6, runs
    assert sorted(r["assetSelection"][0]["path"][0] for r in runs) == [
        "class_token", "class_token", "clip_scores", "counterfactuals", "encoder_root", "scores_db"]
    assert sorted(p.name for p in (dagster_ui.store / "images" / "circle" / "at_night").glob("*.png")) == ["0.png", "1.png"]
