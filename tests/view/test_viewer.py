"""The run viewer on a real run: a two-round workflow-mode GRPO run and its evaluation (python -m fr_jax.train and
python -m fr_jax.eval: the local rollout server, the real sandbox, the SmolLM2 worker), its records written by the
loop, the report built by python -m fr_jax.view and opened from disk in headless Chromium.

The policy is a tiny bigram model over a vocabulary of two whole designs: after the prompt it writes one of them,
then stops. GOOD generates a draft with the worker, runs the Test operator on the right answer and returns it (every
test passes); BAD asks the worker with Custom and returns a wrong answer. So the run has real traces (worker
prompts and replies, public-test runs), passing and failing tests, and groups that differ.
"""

import gzip
import json
import re
import shutil
import time
import urllib.parse

import httpx
import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from fr_jax import eval as fr_eval
from fr_jax import train
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.records import read_records, record_files, rollouts_path
from fr_jax.view.__main__ import main as view_main
from fr_jax.view.live import LiveReport
from fr_jax.view.report import ReportBuilder
from tests.support.browser import headless_chromium, missing, requested_urls
from tests.support.grpo import build_tokenizer, grpo_config, write_bigram_model, write_tasks

GOOD = '''<modification>draft with the worker, then test the known answer</modification>
<graph>
class Workflow:
    def __init__(self, name, llm_config, dataset):
        self.llm = create_llm_instance(llm_config)
        self.generate = operator.CustomCodeGenerate(self.llm)
        self.test = operator.Test(self.llm)

    async def __call__(self, problem, entry_point):
        draft = await self.generate(problem=problem, entry_point=entry_point, instruction=prompt_custom.SOLVE)
        answer = 3 if "three" in problem else 7
        solution = "def f():\\n    return " + str(answer) + "\\n"
        checked = await self.test(problem=problem, solution=solution, entry_point=entry_point)
        return checked["solution"], self.llm.get_usage_summary()["total_cost"]
</graph>
<prompt>
SOLVE = """Write the function f."""
</prompt>'''
BAD = '''<modification>ask the worker, return a guess</modification>
<graph>
class Workflow:
    def __init__(self, name, llm_config, dataset):
        self.llm = create_llm_instance(llm_config)
        self.ask = operator.Custom(self.llm)

    async def __call__(self, problem, entry_point):
        await self.ask(input=problem, instruction=prompt_custom.GUESS)
        return "def f():\\n    return 5\\n", self.llm.get_usage_summary()["total_cost"]
</graph>
<prompt>
GUESS = """Guess a number."""
</prompt>'''
VOCAB = ["<pad>", "</s>", "<unk>", GOOD, BAD]
# every prompt word is <unk>: after the prompt, either design with equal odds, then the end
WRITES_A_DESIGN = {"<unk>": {GOOD: 4.0, BAD: 4.0}, GOOD: {"</s>": 6.0}, BAD: {"</s>": 6.0}}
ROUNDS = 2
pytestmark = pytest.mark.slow  # a real GRPO run with a real worker LLM: minutes on a loaded 2-core machine
EXTERNAL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\/\/")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, workflow_worker):
    """A two-round workflow-mode GRPO run, then its held-out evaluation with the worker prompted directly."""
    root = tmp_path_factory.mktemp("viewer_run")
    tokenizer = build_tokenizer(root / "tokenizer", VOCAB)
    model = write_bigram_model(root / "policy", tokenizer, WRITES_A_DESIGN, vocab=VOCAB, max_position_embeddings=1024)
    cfg = grpo_config(
        root / "run",
        model,
        write_tasks(root / "tasks.jsonl"),
        rounds=ROUNDS,
        mode="workflow",
        data={"max_prompt_tokens": 1000},
        rollout={"n": 4},
        workflow={"worker": "local", "worker_url": f"{workflow_worker.url}/v1", "max_tokens": 12},
    )
    cfg["train"].update(batch_size=8, micro_batches=1, export_hf=True)
    cfg["monitor"]["rollouts"] = "all"
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(path)]) == 0
    assert fr_eval.main(["--config", str(path), "--mode", "workflow"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def report(real_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer_report")
    assert view_main([str(real_run), "--out", str(out)]) == 0
    return out / "index.html"


@pytest.fixture(scope="module")
def records(real_run):
    """The samples as the run wrote them, in the report's order."""
    return [record for path in record_files(real_run) for record in read_records(path)]


@pytest.fixture(scope="module")
def browser():
    if reason := missing():
        pytest.fail(reason)  # not a skip: the browser is part of the test setup, like bubblewrap
    with headless_chromium() as driver:
        yield driver


def open_page(driver, index, fragment, ready_selector):
    driver.get(index.as_uri() + "#" + fragment)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready_selector))


def test_the_run_wrote_records_of_every_round_and_of_its_evaluation(real_run, records):
    rounds = [m for m in read_metrics(real_run) if "reward/total" in m]
    assert len(rounds) == ROUNDS
    for step in range(1, ROUNDS + 1):
        written = read_records(rollouts_path(real_run, step))
        assert len(written) == 8 and {r["round"] for r in written} == {step}
    assert {r["method"] for r in records if r["kind"] == "eval"} >= {"workflow"}
    ran = [r for r in records if r["kind"] == "grpo" and r["well_formed"]]
    outcomes = {(r["design"]["modification"][:5], r["passed"] == r["total"]) for r in ran}
    assert outcomes == {("draft", True), ("ask t", False)}  # both designs were written, and scored as they should


def test_the_report_names_no_outside_address(report):
    files = [report, *(report.parent / "data").rglob("*.js")]
    assert len(files) > 1
    for path in files:
        found = EXTERNAL.search(path.read_text())
        assert found is None, f"{path.name}: {found.group(0)}"


def test_curves_have_a_point_per_round_and_nothing_leaves_the_disk(report, browser, tmp_path):
    requested_urls(browser)
    open_page(browser, report, "curves", "svg.chart circle.pt")
    browser.save_screenshot(str(tmp_path / "curves.png"))
    for key in ("reward/total", "reward/performance", "reward/efficiency", "pass_rate", "well_formed", "worker/calls"):
        points = browser.find_elements(By.CSS_SELECTOR, f'svg.chart[data-key="{key}"] circle.pt')
        assert len(points) == ROUNDS, key
    assert browser.find_elements(By.CSS_SELECTOR, 'svg.chart[data-key="time/rollout_s"] circle.pt')
    assert browser.get_log("browser") == []  # no script error
    urls = requested_urls(browser)
    assert urls and all(url.startswith("file://") for url in urls), urls


def test_a_sample_page_shows_its_design_trace_and_tests(report, records, browser, tmp_path):
    good = next(i for i, r in enumerate(records) if r["kind"] == "grpo" and r["total"] and r["passed"] == r["total"])
    open_page(browser, report, f"sample/{good}", "#tests tr.test-row")
    browser.save_screenshot(str(tmp_path / "sample.png"))
    nodes = [n.get_attribute("data-operator") for n in browser.find_elements(By.CSS_SELECTOR, "#design-graph .op-node")]
    assert nodes == ["query", "CustomCodeGenerate", "Test", "return"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#design-graph path.edge")) >= 3
    calls = browser.find_elements(By.CSS_SELECTOR, "#trace .op-call")
    assert [c.get_attribute("data-operator") for c in calls] == ["CustomCodeGenerate", "Test"]
    prompt = calls[0].find_element(By.CSS_SELECTOR, "pre.worker-prompt").get_attribute("textContent")
    trace = records[good]["workflow"]["trace"]
    assert prompt == trace[0]["worker_calls"][0]["prompt"] and "tests run: 1/1 passed" in calls[1].text
    tests = browser.find_elements(By.CSS_SELECTOR, "#tests tr.test-row")
    assert tests and all("pass" in t.get_attribute("class").split() for t in tests)
    terms = browser.find_element(By.ID, "reward-terms").text
    assert all(term in terms for term in ("performance", "complexity", "efficiency", "format", "total", "advantage"))

    bad = next(i for i, r in enumerate(records) if r["kind"] == "grpo" and r["passed"] < r["total"])
    open_page(browser, report, f"sample/{bad}", "#tests tr.test-row")
    failed = browser.find_elements(By.CSS_SELECTOR, "#tests tr.test-row.fail")
    assert failed and "AssertionError" in failed[0].text
    assert browser.get_log("browser") == []


def test_the_search_filters_the_samples(report, records, browser, tmp_path):
    open_page(browser, report, "samples", "tr.sample-row")

    def shown():
        return int(browser.find_element(By.ID, "match-count").text)

    assert shown() == len(records)
    task = records[0]["task_id"]
    browser.find_element(By.NAME, "task").send_keys(task)
    WebDriverWait(browser, 10).until(lambda d: shown() == sum(r["task_id"] == task for r in records))
    browser.find_element(By.NAME, "task").clear()
    Select(browser.find_element(By.NAME, "op")).select_by_value("Test")
    with_test = sum("Test" in ((r["workflow"] or {}).get("operator_calls") or {}) for r in records)
    WebDriverWait(browser, 10).until(lambda d: shown() == with_test)
    assert 0 < with_test < len(records)
    browser.find_element(By.NAME, "q").send_keys("ask the worker")  # only BAD's design says it
    WebDriverWait(browser, 10).until(lambda d: shown() == 0)
    Select(browser.find_element(By.NAME, "op")).select_by_value("")
    bad = sum("ask the worker" in r["completion"] for r in records)
    WebDriverWait(browser, 10).until(lambda d: shown() == bad > 0)
    browser.save_screenshot(str(tmp_path / "search.png"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.sample-row")
    assert rows and all("failed" in row.text for row in rows)


def test_several_runs_are_overlaid(real_run, browser, tmp_path):
    again = tmp_path / "again" / "run"
    shutil.copytree(real_run, again, ignore=shutil.ignore_patterns("checkpoints", "hf", "tensorboard"))
    assert view_main([str(real_run), str(again), "--out", str(tmp_path / "view")]) == 0
    open_page(browser, tmp_path / "view" / "index.html", "curves", "svg.chart circle.pt")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#legend span.run")) == 2
    for chart in browser.find_elements(By.CSS_SELECTOR, 'svg.chart[data-key="reward/total"]'):
        colors = {line.get_attribute("stroke") for line in chart.find_elements(By.TAG_NAME, "polyline")}
        assert len(colors) == 2 and len(chart.find_elements(By.CSS_SELECTOR, "circle.pt")) == 2 * ROUNDS


def test_eval_tables_link_to_the_records_of_each_query(report, records, browser):
    """python -m fr_jax.eval's table (the policy's workflows beside the worker prompted directly) links each method
    and each query to its records; the evaluations inside the GRPO run get tables from their records."""
    open_page(browser, report, "eval", "table.eval")
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "main h2")]
    assert titles[0].endswith("eval/test.json (test)")
    assert any("after round 0, from the records" in t for t in titles[1:])
    table = browser.find_elements(By.CSS_SELECTOR, "table.eval")[0]
    assert [a.text for a in table.find_elements(By.CSS_SELECTOR, "td a")] == ["workflow", "direct_worker"]
    standalone = [r for r in records if r["kind"] == "eval" and r["round"] is None]
    task = standalone[0]["task_id"]
    browser.find_element(By.CSS_SELECTOR, "main details summary").click()  # the per-query table
    browser.find_element(By.CSS_SELECTOR, f'table.per-task a[href$="task={urllib.parse.quote(task, safe="")}"]').click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.sample-row"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.sample-row")
    expected = [r for r in standalone if r["method"] == "workflow" and r["task_id"] == task]
    assert len(rows) == len(expected) > 0 and all("eval test/workflow" in row.text and task in row.text for row in rows)
    open_page(browser, report, "eval", "table.eval")
    browser.find_elements(By.CSS_SELECTOR, "table.eval")[0].find_elements(By.CSS_SELECTOR, "td a")[1].click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.sample-row"))
    direct = [r for r in standalone if r["method"] == "direct_worker"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.sample-row")) == len(direct) > 0


def test_serve_rebuilds_as_records_arrive(real_run, tmp_path):
    """--serve on a run still being written: a round's file that appears is in the next build, served on
    loopback."""
    live_run = tmp_path / "run"
    shutil.copytree(real_run, live_run, ignore=shutil.ignore_patterns("checkpoints", "hf", "tensorboard"))
    last = rollouts_path(live_run, ROUNDS)
    held_back = last.read_bytes()
    last.unlink()
    with LiveReport(ReportBuilder([live_run], tmp_path / "view", live=True), port=0, every_s=0.2) as live:
        assert live.url.startswith("http://127.0.0.1:")

        def samples() -> int:
            page = httpx.get(live.url, timeout=10).text
            data = json.loads(re.search(r'<script id="fr-data" type="application/json">(.*?)</script>', page).group(1))
            return len(data["index"]["source"])

        before = samples()
        last.write_bytes(held_back)
        for _ in range(100):
            if samples() == before + 8:
                break
            time.sleep(0.2)
        assert samples() == before + 8
        assert len(gzip.decompress(held_back).splitlines()) == 8


def test_bad_arguments_are_named(tmp_path, capsys):
    assert view_main([str(tmp_path / "nowhere")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert view_main([str(tmp_path), str(tmp_path)]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert view_main([str(tmp_path), "--out", str(tmp_path / "v")]) == 2
    assert "is it a run directory" in capsys.readouterr().err
