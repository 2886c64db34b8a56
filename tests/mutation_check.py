"""Plant known bugs one at a time and check that the tests catch each of them.

    python tests/mutation_check.py                 # every mutant
    python tests/mutation_check.py matcher_alpha   # some of them, by name
    python tests/mutation_check.py --list

Each mutant is a small realistic bug (the survivors of the mutation audit in issue #20, and the like). The
checkout is copied to a temporary folder, the bug is planted there (the working tree is never touched), and
each test selection of the mutant runs in the copy: the mutant is caught when a selection fails. The script
exits 1 when a mutant survives, 2 when a mutant no longer applies (the code it changes moved: update the
mutant with the code).

Not part of ``make test`` (it runs the selected tests once per mutant, a few minutes in all); run it after
changing a file that a mutant plants into, and add a mutant with each test written against a bug.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """``edits``: (file, text, replacement) applied in order, each text found exactly once; ``tests``: pytest
    selections (arguments), each of which should fail with the bug planted."""
    name: str
    bug: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("dam_grid_hw", "DAM grid scaled by (H, W) instead of (W, H)",
           (("models/dam.py", "size_xy = spatial_shapes.flip(-1).view(-1, 1, 2)", "size_xy = spatial_shapes.view(-1, 1, 2)"),),
           ("tests/test_parity.py -k nonsquare", "tests/test_dam.py")),
    Mutant("offset_normaliser_hw", "sampling offsets normalised by (H, W) instead of (W, H)",
           (("models/ops/ms_deform_attn.py", "torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)",
             "torch.stack([spatial_shapes[..., 0], spatial_shapes[..., 1]], -1)"),),
           ("tests/test_parity.py -k nonsquare", "tests/test_ms_deform_attn.py -k normalised")),
    Mutant("mask_prediction_coef_ignored", "--mask_prediction_coef ignored (weight hard-coded to 1.0)",
           (("models/token_selection.py", '{"loss_mask_prediction": args.mask_prediction_coef}',
             '{"loss_mask_prediction": 1.0}'),),
           ("tests/test_models_tiny.py -k coefficient",)),
    Mutant("objectness_class_zero", "the objectness rule ranking tokens by class 0 alone with a class-specific head",
           (("models/token_selection.py", 'return {"scores": logits.max(-1)[0], "backbone_outputs"',
             'return {"scores": logits[..., 0], "backbone_outputs"'),),
           ("tests/test_token_selection.py -k best_scored",)),
    Mutant("selection_group_class_labels", "the _backbone group matched with the class labels by a binary head",
           (("models/criterion.py", "yield suffix, outputs[key], proposal_targets", "yield suffix, outputs[key], targets"),),
           ("tests/test_token_selection.py -k hand_computed",)),
    Mutant("kept_count_padded_size", "each image's kept count taken from the padded size",
           (("models/token_selection.py", "return ((~padding_mask).sum(-1) * rho).int() + 1",
             "return (torch.full_like(padding_mask[:, 0], padding_mask.shape[1], dtype=torch.long) * rho).int() + 1"),),
           ("tests/test_token_selection.py -k best_scored",)),
    Mutant("matcher_alpha", "focal matching cost's negative term weighted by alpha instead of 1 - alpha",
           (("models/matcher.py", "neg = (1 - alpha) * prob ** gamma", "neg = alpha * prob ** gamma"),),
           ("tests/test_box_ops_matcher.py -k focal_class_cost", "tests/test_box_ops_matcher.py -k by_hand")),
    Mutant("inverse_sigmoid_eps", "inverse_sigmoid eps 1e-3 instead of 1e-5",
           (("util/misc.py", "eps: float = 1e-5", "eps: float = 1e-3"),),
           ("tests/test_misc.py",)),
    Mutant("scheduler_before_epoch", "lr scheduler stepped at the start of each epoch instead of the end",
           (("runner.py", "            lr_scheduler.step()\n", ""),
            ("runner.py", "            loader_train.batch_sampler.set_epoch(epoch, progress.step)\n",
             "            loader_train.batch_sampler.set_epoch(epoch, progress.step)\n            lr_scheduler.step()\n")),
           ("tests/test_engine.py -k resume_reproduces",)),
    Mutant("clipping_never_applied", "gradient clipping never applied",
           (("engine.py", "grad_norm = grad_norm_and_clip(model.parameters(), clip_max_norm)",
             "grad_norm = grad_norm_and_clip(model.parameters(), 0.0)"),),
           ("tests/test_engine.py -k clipping",)),
    Mutant("data_order_ignores_seed", "training data order ignoring --seed",
           (("runner.py", "shuffle=True, seed=args.seed)", "shuffle=True, seed=0)"),),
           ("tests/test_engine.py -k follow_the_seed",)),
    Mutant("max_size_ignored", "--max_size ignored by the dataset",
           (("datasets/coco.py", "max_size=args.max_size,", "max_size=1333,"),),
           ("tests/test_datasets.py -k max_size",)),
    Mutant("duplicate_annotation_ids", "duplicate annotation ids no longer rejected",
           (("datasets/coco_checks.py", '    _check_unique_ids(dataset["annotations"], "annotations", ann_file)\n', ""),),
           ("tests/test_bad_data.py -k duplicate_annotation_ids",)),
    Mutant("partly_outside_bottom", "boxes partly outside the image at the bottom not reported",
           (("datasets/coco_checks.py", " or y + h > height:", ":"),),
           ("tests/test_bad_annotations.py -k partly_outside",)),
    Mutant("evaluator_scores_every_image", "the evaluator scoring every ground-truth image, not only those given",
           (("datasets/coco_eval.py", "coco_eval.params.imgIds = img_ids", "coco_eval.params.imgIds = sorted(self.coco_gt.getImgIds())"),),
           ("tests/test_datasets.py -k subset",)),
    Mutant("clip_max_norm_check_removed", "the start-up check of --clip_max_norm < 0 removed",
           (("main.py", "    if args.clip_max_norm < 0:\n", "    if False:\n"),),
           ("tests/test_bad_input.py -k invalid_flags",)),
    Mutant("console_every_loss", "the console line showing every loss (auxiliary layers, unscaled) again",
           (("util/console.py", 'HIDDEN_LOSS = re.compile(r"_(\\d+|enc|enc_\\d+|unscaled)$")',
             'HIDDEN_LOSS = re.compile(r"_unscaled$")'),),
           ("tests/test_console.py -k last_decoder_layer",)),
    Mutant("images_per_s_one_process", "images per second counting one process's images only",
           (("util/console.py", "images += images_per_batch(batch) * world_size", "images += images_per_batch(batch)"),),
           ("tests/test_console.py -k images_per_second",)),
    Mutant("tensorboard_eager_import", "tensorboard imported by every run",
           (("util/tensorboard.py", "import numpy as np\n", "import numpy as np\nimport torch.utils.tensorboard\n"),),
           ("tests/test_console.py -k never_imports",)),
    Mutant("tensorboard_no_purge", "a resumed run's TensorBoard steps drawn over those a killed process logged",
           (("util/tensorboard.py", "SummaryWriter(str(log_dir), purge_step=steps_done + 1)", "SummaryWriter(str(log_dir))"),),
           ("tests/test_tensorboard.py -k resumed",)),
    Mutant("browse_boxes_hw", "browsed boxes scaled by (H, W) instead of (W, H)",
           (("tools/browse_dataset.py", "torch.tensor([width, height, width, height]) * scale",
             "torch.tensor([height, width, height, width]) * scale"),),
           ("tests/test_browse_dataset.py -k flip",)),
    Mutant("grad_checkpoint_rng_not_restored", "a checkpointed block recomputed with other dropout masks",
           (("models/activation_checkpoint.py", "use_reentrant=False)", "use_reentrant=False, preserve_rng_state=False)"),),
           ("tests/test_grad_checkpoint.py -k 'deformable or swin'",)),
    Mutant("grad_checkpoint_never_on", "--grad_checkpoint not reaching the decoder",
           (("models/deformable_transformer.py", "            grad_checkpoint=grad_checkpoint)\n        if two_stage:",
             "            grad_checkpoint=False)\n        if two_stage:"),),
           ("tests/test_grad_checkpoint.py -k 'deformable or sdetr'",)),
    Mutant("ema_restarted_on_resume", "--resume restarting the moving average from the weights",
           (("util/ema.py", "    if saved is not None:\n        ema.load_state_dict", "    if False:\n        ema.load_state_dict"),),
           ("tests/test_engine.py -k resume_reproduces", "tests/test_ema.py -k restores")),
    Mutant("ema_updated_on_skipped_steps", "the average updated after a step the fp16 scaler skipped",
           (("engine.py", "                    if ema is not None:  # a step", "                    pass\n                if ema is not None:  # a step"),),
           ("tests/test_ema.py -k applied_steps",)),
    # Issue #26: the survivors of the third round, and model bugs that only the parity fixtures saw.
    Mutant("dam_padding_ties_the_minimum", "DAM top-k padding filled with the map's minimum, not below it",
           (("models/dam.py", "attention_map.min() - 1)", "attention_map.min())"),),
           ("tests/test_dam.py -k ties",)),
    Mutant("float_image_truncated", "a float image tensor truncated to 8 bits instead of rounded",
           (("inference.py", "* 255).round().to(torch.uint8)", "* 255).to(torch.uint8)"),),
           ("tests/test_inference.py -k off_the_8_bit",)),
    Mutant("imagenet_mean_bgr", "the ImageNet mean in BGR order",
           (("datasets/transforms.py", "IMAGENET_MEAN = (0.485, 0.456, 0.406)", "IMAGENET_MEAN = (0.406, 0.456, 0.485)"),),
           ("tests/test_datasets.py -k constant_colour",)),
    Mutant("verify_onnx_ignores_boxes", "verify_onnx ok whatever the boxes",
           (("models/export_check.py", ' and record["boxes_diff"] <= tolerance', ""),),
           ("tests/test_export.py -k disagrees",)),
    Mutant("verify_onnx_ignores_kept_counts", "verify_onnx ok whatever the kept counts",
           (("models/export_check.py", "            else:\n                ok = False\n", "            else:\n                ok = True\n"),),
           ("tests/test_export.py -k disagrees",)),
    Mutant("ema_before_weights_load", "the moving average built before --finetune / --resume load the weights",
           (("runner.py", "    # Of the unwrapped model, before DistributedDataParallel wraps it.\n"
                          "    ema = start_ema(model, args.ema_decay, checkpoint, resume_path)\n", ""),
            ("runner.py", "    checkpoint = None\n    if resume_path is not None:\n",
             "    checkpoint = None\n    ema = start_ema(model, args.ema_decay, checkpoint, resume_path)\n"
             "    if resume_path is not None:\n")),
           ("tests/test_training_state.py -k starts_from_the_weights_loaded",)),
    Mutant("scaler_read_from_wrong_key", "--resume reading the fp16 gradient scaler from another key",
           (("util/checkpoint.py", 'checkpoint.get("scaler"):\n        scaler.load_state_dict(checkpoint["scaler"])',
             'checkpoint.get("grad_scaler"):\n        scaler.load_state_dict(checkpoint["grad_scaler"])'),),
           ("tests/test_training_state.py -k growth_tracker", "tests/test_training_state.py -k fp16_run")),
    Mutant("ranks_seeded_alike", "every rank seeded alike (one random stream for all)",
           (("runner.py", "seed_everything(args.seed + ctx.rank)", "seed_everything(args.seed)"),),
           ("tests/test_engine.py -k two_process",)),
    Mutant("eval_every_off_by_one", "--eval_every counting epoch % N instead of (epoch + 1) % N",
           (("epochs.py", "(epoch + 1) % eval_every == 0", "epoch % eval_every == 0"),),
           ("tests/test_training_state.py -k 'due or grid or eval_every_2'",)),
    Mutant("reference_boxes_attached", "the decoder's next reference boxes not detached",
           (("models/deformable_transformer.py", "reference_points = box_logits[-1].sigmoid().detach()",
             "reference_points = box_logits[-1].sigmoid()"),),
           ("tests/test_model_invariants.py -k detached",)),
    Mutant("valid_ratios_hw_swapped", "valid ratios divided by the other axis's padded size",
           (("models/deformable_transformer.py", "_, h, w = mask.shape", "_, w, h = mask.shape"),),
           ("tests/test_model_invariants.py -k valid_ratios",)),
    Mutant("efficient_queries_from_backbone", "Efficient DETR's query contents gathered from the backbone tokens",
           (("models/deformable_transformer.py", "query_pos, tgt = pos_trans_out, gather_tokens(memory, topk_index)",
             "query_pos, tgt = pos_trans_out, gather_tokens(levels.src, topk_index)"),),
           ("tests/test_model_invariants.py -k efficient_detr",)),
    Mutant("sdetr_stage2_from_first_layer", "SDETR stage 2 starting from stage 1's first decoder output",
           (("models/detr.py", "tgt=hs1[-1])", "tgt=hs1[0])"),),
           ("tests/test_model_invariants.py -k sdetr",)),
    Mutant("detr_eos_on_first_class", "DETR's no-object weight on the first class",
           (("models/criterion.py", "empty_weight[-1] = eos_coef", "empty_weight[0] = eos_coef"),),
           ("tests/test_model_invariants.py -k no_object",)),
    Mutant("focal_alpha_on_negatives", "the focal loss weighting negatives by alpha, positives by 1 - alpha",
           (("models/criterion.py", "loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss",
             "loss = ((1 - alpha) * targets + alpha * (1 - targets)) * loss"),),
           ("tests/test_model_invariants.py -k focal",)),
    Mutant("box_offsets_not_halved", "offsets in a reference box scaled by its full size, not half",
           (("models/ops/ms_deform_attn.py", "reference_points[:, :, None, :, None, 2:] * 0.5)",
             "reference_points[:, :, None, :, None, 2:])"),),
           ("tests/test_model_invariants.py -k halved",)),
    Mutant("decoder_ignores_padding", "the decoder's cross-attention given no padding mask",
           (("models/deformable_transformer.py", "level_start_index, padding_mask, level_shapes)",
             "level_start_index, None, level_shapes)"),),
           ("tests/test_model_invariants.py -k padding",)),
    Mutant("selfcheck_without_exact_borders", "the kernel self-check without points exactly on the border pixels",
           (("models/ops/selfcheck.py", "    for level in (1, 2):\n", "    for level in ():\n"),),
           ("tests/test_ms_deform_attn_selfcheck.py -k border",)),
    Mutant("kernel_drops_minus_one_border",
           "the kernels' inside test px > -1 instead of >= -1 (rebuilds the CPU kernel: a few minutes)",
           (("models/ops/csrc/ms_deform_attn_common.h", "px >= static_cast<T>(-1)", "px > static_cast<T>(-1)"),),
           ("tests/test_ms_deform_attn_selfcheck.py -k passes_its_self_check",)),
    # Issue #25: the model description, and the API's input checks (issue #27).
    Mutant("api_ignores_stored_sizes", "the API and the tools running at 800 px whatever the model was trained at",
           (("inference.py", '_size("val_size", val_size, description.val_size)', '_size("val_size", val_size, 800)'),),
           ("tests/test_model_description.py -k every_tool",)),
    Mutant("stored_flags_not_adopted", "--eval --resume building the flags' default model, not the stored one",
           (("model_config.py", "            setattr(args, name, value)\n            continue", "            continue"),),
           ("tests/test_model_description.py -k needs_no_model_flags",)),
    Mutant("impossible_override_not_refused", "a flag the stored weights cannot serve accepted with a warning",
           (("model_config.py", "if strict and cannot_change(name, stored, current):", "if False:"),),
           ("tests/test_model_description.py -k overrides",)),
    Mutant("description_bounds_unchecked", "a stored description's counts and sizes trusted as they are",
           (("models/description.py", "        if not low <= value <= high:", "        if False:"),),
           ("tests/test_model_description.py -k absurd",)),
    Mutant("class_names_not_stored", "checkpoints without the training set's class names",
           (("runner.py", "categories=dataset_categories(dataset_val))", "categories=[])"),),
           ("tests/test_model_description.py -k hold_the_description",)),
    Mutant("float_tensor_clamped", "a float image tensor in 0-255 clamped to [0, 1] instead of refused",
           (("inference.py", "or low < 0 or high > 1:", "and False:"),),
           ("tests/test_inference_inputs.py -k float_tensor",)),
    Mutant("onnx_predict_rounds", "tools/onnx_predict.py rounding the longer side where the pipeline truncates",
           (("tools/onnx_predict.py", "out_h, out_w = size, int(size * width / height)",
             "out_h, out_w = size, round(size * width / height)"),),
           ("tests/test_export.py -k resize_is_the_pipelines",)),
    Mutant("tie_boundary_best_token", "the top-rho boundary taken at the best kept token, not the last",
           (("models/export_check.py", "boundary = scores[image, own[-1]]", "boundary = scores[image, own[0]]"),),
           ("tests/test_export.py -k kept_token_differences_by_hand",)),
    Mutant("verify_trusts_any_swap", "--verify accepting kept tokens swapped however far from the boundary",
           (("models/export_check.py", "ok = gap <= 2 * tolerance", "ok = True"),),
           ("tests/test_export.py -k wrong_op_in_the_exported_scoring_network",)),
    Mutant("caption_cut_at_edge", "caption labels not moved inside the image at its right edge",
           (("util/draw.py", "left = max(0, min(int(x0), width - 1 - label_w))", "left = int(x0)"),),
           ("tests/test_predict_plot.py -k caption",)),
    Mutant("kernel_built_in_checkout", "the kernel built from the checkout's csrc/ (build.ninja names the checkout)",
           (("models/ops/_extension.py", '"sources": [str(sources / source) for source in _SOURCES[device_type]],',
             '"sources": [str(CSRC / source) for source in _SOURCES[device_type]],'),),
           ("tests/test_kernel_build_cache.py",)),
)


def copy_checkout(destination: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def plant(mutant: Mutant, checkout: Path) -> None:
    for file, text, replacement in mutant.edits:
        path = checkout / file
        source = path.read_text()
        if source.count(text) != 1:
            raise LookupError(f"{mutant.name}: {file} holds {source.count(text)} copies of {text!r} (needs exactly "
                              "one): update the mutant to the current code")
        path.write_text(source.replace(text, replacement))


def run_tests(selection: str, checkout: Path) -> bool:
    """Whether the selection passes in ``checkout``."""
    env = {**os.environ, "DETR_FIXTURES": os.environ.get("DETR_FIXTURES", str(ROOT.parent / "shared" / "fixtures"))}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *shlex.split(selection)]
    return subprocess.run(command, cwd=checkout, env=env, capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:32s} {mutant.bug}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutants {unknown}; --list names them")
    chosen = [by_name[n] for n in args.names] or list(MUTANTS)
    # A selection that fails without any bug would "catch" every mutant: each must pass on the clean code.
    with tempfile.TemporaryDirectory(prefix="mutant-none-") as folder:
        copy_checkout(Path(folder))
        failing = [s for s in dict.fromkeys(t for m in chosen for t in m.tests) if not run_tests(s, Path(folder))]
    if failing:
        print(f"these selections fail without any planted bug: {failing}; fix them first")
        return 2
    survivors, stale = [], []
    for mutant in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as folder:
            checkout = Path(folder)
            copy_checkout(checkout)
            try:
                plant(mutant, checkout)
            except LookupError as err:
                print(f"STALE     {err}", flush=True)
                stale.append(mutant.name)
                continue
            caught = [selection for selection in mutant.tests if not run_tests(selection, checkout)]
        verdict = "caught  " if caught else "SURVIVED"
        print(f"{verdict}  {mutant.name:32s} {len(caught)}/{len(mutant.tests)} selections fail: "
              f"{'; '.join(caught) or '-'}", flush=True)
        if not caught:
            survivors.append(mutant.name)
    print(f"{len(chosen) - len(survivors) - len(stale)} caught, "
          f"{len(survivors)} survived, {len(stale)} stale")
    return 2 if stale else 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
