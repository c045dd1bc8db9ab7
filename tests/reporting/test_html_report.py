"""report.html end to end: written by a run that finishes (with loss, generation and choice eval
sets), by a run stopped with SIGTERM, by a run without evaluation, and by `finetrain report`;
every plot it references exists and decodes as a PNG of the size the page states, and the
page loads nothing from a network."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sacrebleu
from PIL import Image

from helpers import REPO, causal_config, choice_rows, read_metrics, run_cli, trainer_env, write_config, write_jsonl


def assert_report_complete(run_dir: Path, expect: list[str]) -> str:
    """The page exists, every image it references exists and is a PNG of its stated size,
    nothing is fetched from elsewhere, and the plots named in `expect` are among them."""
    page = (run_dir / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)" width="(\d+)" height="(\d+)"', page)
    assert len(images) == page.count("<img"), "every image states its size"
    for src, width, height in images:
        with Image.open(run_dir / src) as image:
            assert image.format == "PNG" and image.size == (int(width), int(height)), src
            image.load()  # decodes
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page  # opens from disk alone
    files = {Path(src).name for src, _, _ in images}
    assert set(expect) <= files, sorted(files)
    assert {p.name for p in (run_dir / "report").glob("*.png")} == files  # no stale plot left
    return page


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run with a held-out chat set answered and scored by ROUGE-L, BLEU and chrF, and a
    choice set marked as a forgetting check."""
    tmp = tmp_path_factory.mktemp("finished")
    bench = write_jsonl(tmp / "bench.jsonl", choice_rows(12))
    cfg = causal_config(tmp, rows=96, train={"max_steps": 6, "eval_every": 3},
                        data={"eval": {"fraction": 0.1, "generate": 3, "max_new_tokens": 6,
                                       "metrics": ["rouge_l", "bleu", "chrf"],
                                       "sets": [{"name": "bench", "path": str(bench), "format": "choice",
                                                 "fields": {"context": "question"}, "forgetting": True}]}})
    proc = run_cli(write_config(cfg, tmp / "config.yaml"))
    run_dir = Path(cfg["run"]["output_dir"])
    assert proc.stdout.rstrip().endswith(f"report:     {run_dir / 'report.html'}")
    return run_dir


@pytest.mark.slow
def test_a_finished_run_writes_its_report(finished):
    page = assert_report_complete(finished, ["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "memory.png",
                                             "eval-sft-loss.png", "eval-sft-answers.png", "eval-sft-corpus.png",
                                             "eval-bench-accuracy.png"])
    assert "finished at step 6/6" in page and "Held-out answers, first and last evaluation" in page
    assert "<th>step 0</th><th>step 6</th>" in page
    generations = [json.loads(line) for line in (finished / "generations.jsonl").read_text().splitlines()]
    assert generations[0]["generation"] in page.replace("&#x27;", "'") or generations[0]["generation"] == ""


def test_bleu_and_chrf_of_a_run_are_sacrebleus_over_its_answers(finished):
    """The set's BLEU and chrF at each evaluation are sacrebleu's corpus scores of that
    evaluation's answers; per answer only the metrics the set asks for (ROUGE-L) are kept."""
    generations = [json.loads(line) for line in (finished / "generations.jsonl").read_text().splitlines()]
    evals = [r for r in read_metrics(finished) if "eval/sft/bleu" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for record in evals:
        rows = [g for g in generations if g["step"] == record["step"]]
        hypotheses, references = [g["generation"] for g in rows], [g["reference"] for g in rows]
        assert record["eval/sft/bleu"] == sacrebleu.corpus_bleu(hypotheses, [references]).score
        assert record["eval/sft/chrf"] == sacrebleu.corpus_chrf(hypotheses, [references]).score
        assert "eval/sft/f1" not in record and all("f1" not in g and "rougeL" in g for g in rows)
        assert record["eval/bench/acc"] in [k / 12 for k in range(13)] and "eval/bench/acc_change" in record


def test_finetrain_report_rewrites_it_and_refuses_a_folder_that_is_no_run(finished, tmp_path):
    (finished / "report.html").unlink()
    (finished / "report" / "stale.png").write_bytes(b"not a plot")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "report", str(finished)], capture_output=True, text=True,
                          cwd=REPO, env=trainer_env(), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"report: {finished / 'report.html'}"
    assert_report_complete(finished, ["loss.png", "eval-bench-accuracy.png"])
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "report", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, env=trainer_env(), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"finetrain: {tmp_path}: not a finetrain run folder (no metrics.jsonl or summary.json in it)"


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_without_evaluation_reports_what_it_did(tmp_path):
    """Stopped after a few steps, with no eval set: the report has the training curves, says
    there is no evaluation, and the summary's status."""
    cfg = causal_config(tmp_path, rows=96, train={"max_steps": 500})
    out = Path(cfg["run"]["output_dir"])
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(write_config(cfg, tmp_path / "c.yaml"))],
                            cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not metrics.is_file() or metrics.read_text().count('"loss"') < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    page = assert_report_complete(out, ["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "memory.png"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and f"stopped at step {summary['steps']}/500" in page
    assert "This run has no evaluation" in page and "eval-" not in page
