"""tests/cuda_check.py must not rot: its CPU mode runs the whole sequence here, and its exit status
counts only the checks that ran."""

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import cuda_check  # noqa: E402

LOSSES = [
    "ir_loss",
    "ir_nce_loss",
    "ball_loss",
    "ann_loss",
    "la_loss",
    "infonce_loss",
    "MemoryBank.update",
]


def test_cpu_mode_runs_every_check_and_reports_json_lines(tmp_path):
    res = subprocess.run(
        [sys.executable, "tests/cuda_check.py", "--device", "cpu", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
    )
    lines = [json.loads(line) for line in res.stdout.splitlines()]  # stdout holds JSON lines only
    status = {r["check"]: r["status"] for r in lines}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    algos = ("ir", "ball", "ann", "la")
    expected_pass = (
        ["environment"]
        + [f"agree {n}" for n in LOSSES]
        + [f"train {a} fp32" for a in ("ir", "la")]
        + ["resume", "torchrun", "ddp", "benchmark"]
    )
    not_applicable = (
        [f"no_sync {n}" for n in LOSSES]
        + [f"no_sync train_step {a}" for a in algos]
        + [f"train {a} {p}" for p in ("bf16", "fp16") for a in algos]
        + ["train ball fp32", "train ann fp32"]  # the CPU mode's time limit
        + ["resume fp16"]
    )
    assert {c: status.get(c) for c in expected_pass} == {c: "pass" for c in expected_pass}
    assert {c: status.get(c) for c in not_applicable} == {c: "n/a" for c in not_applicable}
    summary = lines[-1]
    assert summary["check"] == "summary" and summary["status"] == "pass" and summary["failed"] == []
    assert summary["ran"] == len(expected_pass)
    by_name = {r["check"]: r for r in lines}
    # resume: three processes (stopped by SIGTERM mid-epoch, resumed, uninterrupted), same weights
    assert by_name["resume"]["identical"] and by_name["resume"]["stopped_at_epoch_batch"][0] == 1
    # ddp: two gloo ranks on different data end with the same bank and weights, all rows written
    ddp = by_name["ddp"]
    assert ddp["world"] == 2 and ddp["backend"] == "gloo"
    for algo in ("ir", "la"):
        assert ddp[algo]["bank_max_abs_diff_across_ranks"] == 0
        assert ddp[algo]["weights_max_abs_diff_across_ranks"] == 0
        assert ddp[algo]["rows_written_are_all_ranks_rows"] and ddp[algo]["sync_error"] is None
    modes = by_name["agree la_loss"]["modes"]
    assert set(modes) == {"fp32", "bf16 autocast", "fp16 autocast", "bf16 inputs", "fp16 inputs"}
    assert all(m["ok"] and m["loss_dtype"] == "float32" for m in modes.values())
    bench = by_name["benchmark"]
    assert [r["algo"] for r in bench["rows"]] == ["ir", "la"] and bench["ir_floor_met"] is None
    assert "faiss" in bench["rows"][1]["kmeans_faiss"]
    # the same lines are written to --out, beside the trainer's own output
    assert (tmp_path / "cuda_check.jsonl").read_text().splitlines() == res.stdout.splitlines()
    assert "epoch 1 done" in (tmp_path / "trainer_output.log").read_text()


def test_exit_status_counts_failures_of_checks_that_ran_and_not_the_rest(monkeypatch, capsys):
    torch_threads = torch.get_num_threads()
    monkeypatch.setattr(cuda_check, "check_benchmark", lambda *a: (False, dict(why="made to fail")))
    try:
        assert cuda_check.main(["--device", "cpu", "--only", "benchmark", "no_sync"]) == 1
    finally:
        torch.set_num_threads(torch_threads)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    status = {r["check"]: r["status"] for r in lines}
    assert (
        status["benchmark"] == "fail"
        and status["no_sync ir_loss"] == "n/a"
        and "resume" not in status
    )
    assert (
        lines[-1]["failed"] == ["benchmark"] and lines[-1]["ran"] == 2
    )  # environment and benchmark


def test_agreement_check_catches_a_loss_that_computes_in_half_precision():
    """Eq. 6 written carelessly -- the matmul in the input's dtype, and in bf16 under autocast --
    must fail the half-precision modes that the real ir_loss passes."""
    size = cuda_check.SIZES["cpu"]
    inputs, fixed = cuda_check.make_inputs(size)

    def careless_ir_loss(z, f, g):
        logits = z @ f["bank"].to(z.dtype).T / cuda_check.TAU
        return F.cross_entropy(logits.float(), f["idx"])

    ok, detail = cuda_check.check_agree(careless_ir_loss, "z", inputs, fixed, torch.device("cpu"))
    assert not ok and detail["modes"]["fp32"]["ok"]
    assert not detail["modes"]["bf16 autocast"]["ok"] and not detail["modes"]["bf16 inputs"]["ok"]
    ok, detail = cuda_check.check_agree(
        *cuda_check.loss_cases(size)["ir_loss"], inputs, fixed, torch.device("cpu")
    )
    assert ok, detail


def test_benchmark_floor_fails_a_slow_h200_and_judges_only_app_d_sizes():
    row = dict(
        algo="ir",
        gpu="NVIDIA H200",
        image_size=224,
        batch_size=256,
        precision="bf16",
        bank_rows=1_281_167,
        images_per_s=3999.0,
        loss=14.1,
        peak_gpu_mem_gib=9.5,
    )
    la = dict(row, algo="la", images_per_s=3000.0)
    ok, detail = cuda_check.judge_benchmark([row, la])
    assert not ok and detail["ir_floor_met"] is False and detail["ir_peak_gpu_mem_gib"] == 9.5
    assert cuda_check.judge_benchmark([dict(row, images_per_s=4000.0), la])[0]
    # another GPU, or other sizes: reported, not judged; a non-finite loss fails anywhere
    assert cuda_check.judge_benchmark([dict(row, gpu="NVIDIA A10"), la]) == (
        True,
        dict(
            detail,
            ir_floor="n/a: judged on an H100 / H200 at App. D's sizes only",
            ir_floor_met=None,
            rows=[dict(row, gpu="NVIDIA A10"), la],
        ),
    )
    assert cuda_check.judge_benchmark([dict(row, batch_size=128), la])[1]["ir_floor_met"] is None
    assert not cuda_check.judge_benchmark([dict(row, gpu=None, loss=float("nan")), la])[0]


def test_ddp_judge_fails_on_any_rank_difference_missing_row_or_host_sync():
    good = dict(
        bank_max_abs_diff_across_ranks=0.0,
        weights_max_abs_diff_across_ranks=0.0,
        rows_written_are_all_ranks_rows=True,
        sync_error=None,
    )
    assert cuda_check.judge_ddp(dict(world=2, ir=good, la=good))
    for bad in (
        dict(bank_max_abs_diff_across_ranks=1e-7),
        dict(weights_max_abs_diff_across_ranks=2e-3),
        dict(rows_written_are_all_ranks_rows=False),
        dict(sync_error="called a synchronizing CUDA operation"),
    ):
        assert not cuda_check.judge_ddp(dict(world=2, ir=good, la=dict(good, **bad)))
    assert not cuda_check.judge_ddp(dict(world=1, ir=good, la=good))


def test_bench_trainer_pipelines_draw_the_same_views_as_todays_pil_path():
    """tests/bench_trainer.py's faster paths are only admissible if they keep App. D's views: with
    the same torch seed each path must give the same crop, grayscale, jitter and flip as the PIL
    path, up to resampling (a different crop or jitter draw differs by tens of levels)."""
    import bench_trainer

    data = bench_trainer.make_jpeg()
    assert 80_000 < len(data) < 160_000  # ImageNet's mean JPEG is ~110 kB
    paths = bench_trainer.pipelines(64)

    def view(path, seed):
        torch.manual_seed(seed)
        x = data
        for _, fn in paths[path]:
            x = fn(x)
        return x

    for seed in range(4):
        ref = view("pil-uint8", seed)
        assert ref.dtype == torch.uint8 and ref.shape == (3, 64, 64)
        assert torch.allclose(
            view("pil", seed) * torch.tensor(cuda_check.it.IMAGENET_STD).view(3, 1, 1)
            + torch.tensor(cuda_check.it.IMAGENET_MEAN).view(3, 1, 1),
            ref / 255.0,
            atol=1e-6,
        )
        for path in ("v2", "mixed"):
            assert (view(path, seed).float() - ref.float()).abs().mean() < 2.0, (path, seed)
        other = view("pil-uint8", seed + 100)
        assert (other.float() - ref.float()).abs().mean() > 10.0  # another draw: another view
