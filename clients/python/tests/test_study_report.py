"""scripts/study.py on a fresh checkout: runs/ is empty (checkpoints and live logs do not travel
between machines), so `report` must rebuild the tables from the committed copies, not from
nothing, and `run` must take the committed finished runs as done."""
import importlib.util
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def load_study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "scripts", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_on_a_fresh_checkout_keeps_the_committed_runs(tmp_path, monkeypatch):
    study = load_study()
    docs = tmp_path / "docs"
    shutil.copytree(study.docs_dir(2), docs)
    before = (docs / "summary.md").read_text()
    monkeypatch.setattr(study, "docs_dir", lambda n: str(docs))
    monkeypatch.setattr(study, "runs_dir", lambda n: str(tmp_path / "runs"))
    study.report(type("Args", (), {"study": 2})())
    after = (docs / "summary.md").read_text()
    assert after == before, "the report rebuilt from the committed logs is the committed report"
    assert "| grpo-s0 | 500/500 |" in after and "(stopped)" in after
    done = [s["name"] for s in study.queue2() if study.progress(2, s)[0]]
    assert done[:2] == ["grpo-s0", "lp_reg-s0"], done
