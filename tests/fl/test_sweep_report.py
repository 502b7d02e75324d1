"""Sweeps (expansion, validation, resumable runs) and reports (plots, HTML, CSV)."""


import pytest
from mlflow import MlflowClient

from fl.config import ConfigError
from fl.report import plot, render_html
from fl.sweep import load_sweep

BASE = """
[experiment]
seed = 0
[federation]
num_clients = 2
rounds = 1
local_steps = 1
batch_size = 8
[data]
dataset = "digits"
[model]
family = "vit"
size = "tiny"
"""


def _write(tmp_path, sweep_body):
    (tmp_path / "base.toml").write_text(BASE)
    path = tmp_path / "sweep.toml"
    path.write_text(sweep_body)
    return path


def test_grid_times_points_expands_and_validates(tmp_path):
    path = _write(tmp_path, """
[sweep]
name = "s"
base = "base.toml"
set = { "federation.rounds" = 2 }
[sweep.grid]
"optimizer.lr" = [0.01, 0.1]
"federation.batch_size" = [4, 8, 16]
[[sweep.points]]
"attack.name" = "update_norm"
[[sweep.points]]
"attack.name" = "none"
""")
    sweep = load_sweep(path)
    assert len(sweep.points) == 2 * 3 * 2
    assert sweep.swept_keys == ["optimizer.lr", "federation.batch_size", "attack.name"]
    assert all(p.config.federation.rounds == 2 for p in sweep.points)
    assert len({p.digest for p in sweep.points}) == 12  # every point distinct
    assert load_sweep(path).digest == sweep.digest  # stable


@pytest.mark.parametrize("body, fragment", [
    ("[sweep]\nbase = 'base.toml'\nbogus = 1\n", "unknown sweep key 'sweep.bogus'"),
    ("[sweep]\nbase = 'base.toml'\n[sweep.grid]\n'optimizer.lr' = []\n", "non-empty list"),
    ("[sweep]\nbase = 'base.toml'\n[sweep.grid]\n'federation.rounds' = [0]\n", "'federation.rounds'"),
    ("[sweep]\nbase = 'missing.toml'\n", "config file not found"),
    ("name = 'x'\n", "missing [sweep] table"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, body, fragment):
    with pytest.raises(ConfigError) as info:
        load_sweep(_write(tmp_path, body))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_plot_and_html_are_self_contained():
    rows = [
        {"name": f"p{i}", "status": "FINISHED", "epsilon": e, "accuracy": a, "attack_psnr": p, "run_id": f"r{i}",
         "fedprobe.dataset": "digits", "fedprobe.model": "vit-tiny", "attack": "dlg"}
        for i, (e, a, p) in enumerate([(0.5, 0.6, 12.0), (2.0, 0.8, 18.0), (float("inf"), 0.9, 30.0)])
    ]
    png = plot(rows, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = render_html("title", "parent", ["name", "epsilon", "accuracy", "attack_psnr"], rows, png)
    assert page.count("<tr>") == 4 and "∞" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # nothing fetched by the browser


@pytest.mark.slow
def test_sweep_runs_children_resumes_and_reports(tmp_path, monkeypatch):
    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, """
[sweep]
name = "tiny"
base = "base.toml"
[sweep.grid]
"optimizer.lr" = [0.001, 0.01]
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(path), "--tracking-uri", uri, "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=uri)
    parent = client.search_runs([client.get_experiment_by_name("fedprobe").experiment_id],
                                filter_string="tags.`fedprobe.sweep` = 'tiny'")[0]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all("final_accuracy" in c.data.metrics for c in children)
    assert {c.data.params["optimizer.lr"] for c in children} == {"0.001", "0.01"}
    # rerun: both points are skipped, no new child appears
    assert main(["sweep", str(path), "--tracking-uri", uri, "--no-progress", "--no-report"]) == 0
    again = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(again) == 2
    out = tmp_path / "rep"
    assert main(["report", str(path), "--tracking-uri", uri, "--out", str(out)]) == 0
    assert (out / "privacy_utility.png").stat().st_size > 10_000
    assert (out / "report.html").read_text().count("<tr>") == 3
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/privacy_utility.png", "report/points.csv"} <= arts


def test_plot_puts_audit_lower_and_accountant_upper_bound_on_one_axis(tmp_path):
    from PIL import Image
    import io

    rows = [{"name": f"p{i}", "status": "FINISHED", "epsilon": e, "audit_epsilon_lower": lb, "accuracy": 0.5 + i / 10,
             "run_id": f"r{i}", "fedprobe.dataset": "digits", "fedprobe.model": "vit-tiny", "attack": "none"}
            for i, (e, lb) in enumerate([(2.2, 0.4), (8.6, 2.5), (float("inf"), 3.3)])]
    plain = Image.open(io.BytesIO(plot([{k: v for k, v in r.items() if k != "audit_epsilon_lower"} for r in rows], "t")))
    audited = Image.open(io.BytesIO(plot(rows, "t")))
    assert audited.size[1] > plain.size[1]  # one more row of panels: the bounds
    (tmp_path / "bounds.png").write_bytes(plot(rows, "t"))


SWEPT = ["defenses.0.params.noise_multiplier", "defenses"]


def _point(i, sigma, acc, rec, defense="dp_sgd"):
    eps = {0.5: 5.0, 0.1: 300.0, 1.0: 1.5}.get(sigma, float("inf"))
    return {"name": f"{i:03d}", "status": "FINISHED", "run_id": f"r{i}", "fedprobe.dataset": "digits",
            "fedprobe.model": "vit-tiny", "attack": "best_of", "defense": defense, "recovered_psnr": 30.0,
            "defenses.0.params.noise_multiplier": "" if sigma is None else str(sigma), "defenses": "",
            "epsilon": float("inf") if sigma is None else eps, "accuracy": acc, "attack_recovered_fraction": rec,
            "attack_recovered_baseline": 0.1}


def test_report_has_one_panel_per_question_labelled_points_in_swept_order_and_a_no_defense_star():
    from fl.report import figure, setting

    # accuracy is not monotone in epsilon here: a curve sorted by x would zig-zag differently from the sweep order
    rows = [_point(0, 0.5, 0.40, 0.0), _point(1, 1.0, 0.30, 0.0), _point(2, 0.1, 0.20, 0.5),
            _point(3, None, 0.9, 1.0, defense="none")]
    assert [setting(r, SWEPT) for r in rows] == ["σ=0.5", "σ=1.0", "σ=0.1", "no defense"]
    fig = figure(rows, "t", SWEPT)
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == 3  # utility vs eps, attack vs eps, utility vs attack: no repeated panel
    ax_u, ax_a, ax_ua = visible
    curve = next(line for line in ax_u.get_lines() if line.get_marker() == "o")
    assert list(curve.get_ydata()) == [0.20, 0.40, 0.30]  # sigma 0.1, 0.5, 1.0: the swept order
    stars = [line for line in ax_u.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and stars[0].get_xdata()[0] > 300.0 and stars[0].get_ydata()[0] == 0.9
    assert ax_u.get_xticklabels()[-1].get_text() == "∞"
    dashed = [line for line in ax_a.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {0.1}  # the data-free guess
    assert {t.get_text() for t in ax_ua.texts} == {"σ=0.5", "σ=1.0", "σ=0.1", "no defense"}
    assert "dB" in ax_a.get_ylabel() and "share" in ax_u.get_ylabel()


def test_report_table_shows_no_defense_as_infinite_epsilon_and_each_point_once():
    from types import SimpleNamespace as NS

    from fl.report import collect_points, render_html

    def run(rid, digest, status, t, acc):
        return NS(info=NS(run_id=rid, run_name=f"000 {digest}", status=status, start_time=t),
                  data=NS(params={"defenses": "[]"}, metrics={"final_accuracy": acc},
                          tags={"fedprobe.config_digest": digest, "defense": "none"}))

    children = [run("b", "d1", "FINISHED", 2, 0.7), run("a", "d1", "FAILED", 3, 0.1), run("c", "d2", "RUNNING", 1, 0.2)]
    client = NS(search_runs=lambda *a, **k: sorted(children, key=lambda r: -r.info.start_time))
    parent = NS(info=NS(experiment_id="1", run_id="p"), data=NS(tags={"fedprobe.swept_keys": '["defenses"]'}))
    _, rows = collect_points(client, parent)
    assert sorted((r["run_id"], r["status"]) for r in rows) == [("b", "FINISHED"), ("c", "RUNNING")]
    page = render_html("t", "p", ["name", "epsilon", "accuracy"], rows, b"png")
    assert page.count("∞ (no defense)") == 2


def test_a_rerun_sweep_marks_children_left_running_by_a_killed_sweep_killed(tmp_path):
    from types import SimpleNamespace as NS

    from fl.sweep import mark_stale_children

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    stale = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    done = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(done, "FINISHED")
    other = client.create_run(exp).info.run_id  # not a child of this sweep: untouched
    assert mark_stale_children(NS(client=client, experiment_id=exp, run_id=parent)) == 1
    assert [client.get_run(r).info.status for r in (stale, done, other)] == ["KILLED", "FINISHED", "RUNNING"]
