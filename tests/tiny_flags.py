"""The tiny model configurations of the tests, in one place: main.py flags that build models small enough to
train a step in a second on the CPU. Each suite keeps the set it was written with (their numbers differ on
purpose: query counts, layers, image sizes); import them under the names the suites use."""

# tests/test_backbones.py
BACKBONES_SPARSE_DETR = ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--rho", "0.1",
                         "--use_enc_aux_loss"]

# tests/test_backbones.py
BACKBONES_TINY = ["--hidden_dim", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64",
                  "--num_queries", "10", "--num_feature_levels", "2", "--num_classes", "5", "--device", "cpu"]

# tests/test_bad_input.py
BAD_INPUT_TINY = ("--backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 2 --enc_layers 1 --dec_layers 1 "
                  "--dim_feedforward 64 --num_queries 10 --num_feature_levels 3 --enc_n_points 2 --dec_n_points 2 "
                  "--num_classes 4 --batch_size 2 --num_workers 0 --device cpu --scales 64 --val_size 64 --max_size 64").split()

# tests/test_bad_input.py
BAD_INPUT_SPARSE = ["--with_box_refine", "--two_stage", "--rho", "0.3", "--use_enc_aux_loss"]

# tests/test_benchmark.py
# ResNet-18 frozen (no backbone backward or optimiser state), a one-layer 32-wide transformer, 64x96 images.
BENCHMARK_TINY = ("--backbone resnet18 --lr_backbone 0 --hidden_dim 32 --nheads 2 --enc_layers 1 --dec_layers 1 "
                  "--dim_feedforward 32 --num_queries 10 --num_classes 5 --num_feature_levels 2")

# tests/test_distributed.py
# A tiny Sparse DETR (every loss group: decoder, auxiliary decoder, two-stage proposals, encoder auxiliary,
# scoring network), no dropout so that the two runs see the same function.
DISTRIBUTED_TINY_SPARSE = ("--device cpu --backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 2 --enc_layers 2 "
                           "--dec_layers 2 --dim_feedforward 64 --num_queries 8 --num_feature_levels 3 --enc_n_points 2 "
                           "--dec_n_points 2 --num_classes 4 --dropout 0 --with_box_refine --two_stage --eff_query_init "
                           "--eff_specific_head --rho 0.3 --use_enc_aux_loss --lr_backbone 1e-5").split()

# tests/test_engine.py
# A tiny Deformable DETR on 64-pixel images; the frozen backbone (--lr_backbone 0) keeps the steps cheap.
ENGINE_TINY = ("--model deformable --backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 2 --enc_layers 1 "
               "--dec_layers 1 --dim_feedforward 64 --num_queries 10 --num_feature_levels 3 --enc_n_points 2 "
               "--dec_n_points 2 --num_classes 4 --batch_size 2 --num_workers 0 --device cpu --lr_scaling none "
               "--scales 64 --val_size 64 --max_size 64 --lr_backbone 0 --log_every 2").split()

# tests/test_engine.py
ENGINE_SPARSE_DETR = ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--rho", "0.3",
                      "--use_enc_aux_loss", "--enc_layers", "2"]

# tests/test_models_detr.py
DETR_TINY = ["--device", "cpu", "--backbone_from_scratch", "--backbone", "resnet18", "--hidden_dim", "32",
             "--dim_feedforward", "64", "--num_queries", "6", "--num_classes", "5"]  # test_models_detr.NUM_CLASSES

# tests/test_models_tiny.py
MODELS_TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "64",
               "--nheads", "2", "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "32",
               "--num_queries", "8", "--dropout", "0", "--num_classes", "5", "--enc_n_points", "2", "--dec_n_points", "2"]

# tests/test_models_tiny.py
MODELS_SPARSE = ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--use_enc_aux_loss"]

# tests/test_predict_plot.py
PREDICT_TINY = ["--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "64", "--nheads", "2",
                "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64", "--num_queries", "10",
                "--num_feature_levels", "2", "--num_classes", "5", "--device", "cpu"]

# tests/test_export.py
# The smallest model of each variant: its ONNX export and check dominate, so one layer, 32 wide, 2 levels.
EXPORT_TINY = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1",
               "--dec_layers", "1", "--dim_feedforward", "32", "--num_queries", "8", "--num_classes", "5",
               "--enc_n_points", "2", "--dec_n_points", "2", "--num_feature_levels", "2"]
EXPORT_VARIANTS = {
    "deformable": [],
    "refine": ["--with_box_refine"],
    "two_stage": ["--with_box_refine", "--two_stage"],
    "efficient_detr": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head"],
    "sparse_detr": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--rho", "0.3",
                    "--use_enc_aux_loss", "--enc_layers", "2"],
    "sparse_detr_objectness": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--rho",
                               "0.3", "--use_enc_aux_loss", "--enc_layers", "2", "--token_selection", "objectness"],
    "detr": ["--model", "detr"],
    "sdetr": ["--model", "sdetr", "--sdetr_stage1_enc_layers", "1", "--sdetr_stage1_dec_layers", "1", "--sdetr_stage1_enc_heads", "2",
              "--sdetr_stage1_dec_heads", "2", "--sdetr_stage2_enc_layers", "1", "--sdetr_stage2_dec_layers", "1",
              "--sdetr_stage2_dec_heads", "2"],
}
# tests/test_grad_checkpoint.py
# Dropout on and every backbone stage training (from scratch: the stem and layer1 too), 32 wide.
GRAD_CHECKPOINT_TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "32",
                        "--nheads", "2", "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "32",
                        "--num_queries", "6", "--num_feature_levels", "2", "--enc_n_points", "2", "--dec_n_points", "2",
                        "--num_classes", "5", "--dropout", "0.1"]
