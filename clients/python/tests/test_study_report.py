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


def test_token_level_tables_count_what_train_step_reported():
    study = load_study()
    s = study.spec("lp_reg-s0", "lp_reg", 0, 60)
    check = study.vocabulary(3, s)
    spark = next(i for i, t in check.items() if t == "' check'")
    metrics = [{"step": k, "entropy": 0.1, "spark_rate": 0.25 if k <= 10 else 0.5, "proxy_noise_mass": 0.001,
                "low_prob_proxy_kept": 0.5, "lp_reg_regularized": 3,
                "lp_reg_tokens": {str(spark): 2, "20": 1}, "lp_reg_probability_buckets": [0, 0, 1, 2, 0]}
               for k in range(1, 61)]
    lines = study.token_level(3, [(s, "", metrics, [])])
    text = "\n".join(lines)
    assert "| lp_reg-s0 | 0.250 | 0.500 |" in text, text
    assert "| lp_reg-s0 | 3.0 | 3.0 |" in text, text
    # Steps 1-50: 150 tokens, a third in [1e-3, 0.01), two thirds in [0.01, 0.1); ' check' is 2 of 3.
    assert "| lp_reg-s0 | 1-50 | 150 | 0.00 | 0.00 | 0.33 | 0.67 | 0.00 | ' check' 0.67," in text, text
    assert "| lp_reg-s0 | 51-60 | 30 |" in text, text
