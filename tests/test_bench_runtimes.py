"""tools/benchmark.py model --runtimes: onnxruntime and torch.compile rows beside eager, checked against it."""
import json

from tools import benchmark
from tiny_flags import BENCHMARK_TINY as TINY

QUICK = ["--device", "cpu", "--system_malloc", "--height", "96", "--width", "128", "--warmup", "0", "--repeats", "1",
         "--batch_sizes", "1", "2", "--measure", "fps", "--threads", "1", "--model_args", TINY]


def test_onnxruntime_row_beside_eager_agrees_and_takes_batches(capsys, tmp_path):
    """Catches: an onnxruntime row timed without being checked against eager, a graph that fixed the batch
    (batch 2 would fail), rows out of their model's order."""
    jsonl = tmp_path / "rows.jsonl"
    benchmark.model_benchmark(["--models", "sparse_detr_rho0.1", *QUICK, "--runtimes", "eager", "onnxruntime",
                               "--jsonl", str(jsonl)])
    out = capsys.readouterr().out
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["model"] for r in records] == ["sparse_detr_rho0.1", "sparse_detr_rho0.1 (onnxruntime)"]
    assert all(r["fps_bs1"] > 0 and r["fps_bs2"] > 0 for r in records)
    note = next(line for line in out.splitlines() if line.startswith("note: sparse_detr_rho0.1 (onnxruntime)"))
    logits_diff = float(note.split("max |logits diff| ")[1].split(",")[0])
    assert logits_diff <= 1e-4, note


def test_runtime_that_differs_from_eager_gets_no_row():
    """Catches: a fast but wrong runtime reported as a result."""
    import torch
    from tools import bench_runtimes
    from util.misc import nested_tensor_from_tensor_list

    class Model(torch.nn.Module):
        def forward(self, samples):
            x = samples.tensors.mean()
            # Differs once compiled: torch.compiler.is_compiling() is True only inside the compiled graph.
            offset = 1.0 if torch.compiler.is_compiling() else 0.0
            return {"pred_logits": (x + offset).view(1, 1, 1), "pred_boxes": x.view(1, 1, 1)}

    notes = []
    samples = nested_tensor_from_tensor_list([torch.randn(3, 8, 8)])
    rows = bench_runtimes.runtime_models("m", Model(), samples, ["eager", "compile"], notes, workdir=None)
    assert rows == {} and len(notes) == 1 and "not timed" in notes[0], notes


def test_runtime_agreement_pairs_swapped_queries_as_verify_does():
    """Catches: a runtime refused because two near-tied two-stage proposals swapped places (``--verify`` pairs
    queries by minimum cost; the benchmark must judge agreement the same way), or a real difference hidden."""
    import torch
    from tools import bench_runtimes

    logits, boxes = torch.rand(2, 5, 3), torch.rand(2, 5, 4)
    swapped = [1, 0, 2, 3, 4]
    expected = {"pred_logits": logits, "pred_boxes": boxes}
    got = {"pred_logits": logits[:, swapped], "pred_boxes": boxes[:, swapped]}
    assert bench_runtimes.max_differences(expected, got) == (0.0, 0.0)
    got["pred_boxes"] = got["pred_boxes"].clone()
    got["pred_boxes"][1, 3, 2] += 0.5
    assert abs(bench_runtimes.max_differences(expected, got)[1] - 0.5) < 1e-6
