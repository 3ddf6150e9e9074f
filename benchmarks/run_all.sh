#!/usr/bin/env bash
# Reproduce every number in README (about 4 hours on 2 cores). Results land in benchmarks/results/.
# Run it alone: the speed benchmark times onnxruntime on a machine that should be otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
# speed and op profile: the CPU decides the file (speed.md: an AVX2 CPU without VNNI)
if grep -qE 'avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo; then cpu=_vnni vnni=runs/speed/vitq-w8a8-ort-vnni.onnx
else cpu= vnni=; fi
python benchmarks/speed.py -o "benchmarks/results/speed$cpu.md"
for b in 1 8; do  # (ort-w8a8-minmax: the calibration speed.py kept on that run)
    python benchmarks/op_profile.py runs/speed/fp32.onnx runs/speed/ort-w8a8-minmax.onnx runs/speed/vitq-w8a8-ort.onnx \
        $vnni runs/speed/vitq-w4a4-ort.onnx --batch $b --runs $((b == 1 ? 100 : 20)) \
        -o "benchmarks/results/op_profile${cpu}_b$b.md"
done
python benchmarks/gemm_kernels.py -o benchmarks/results/gemm_kernels.md
python benchmarks/accuracy.py -o benchmarks/results/accuracy.md \
    --configs deit_t:8/8:repq deit_t:8/8:repq:qdq deit_t:6/6:repq deit_t:6/6:repq:qdq \
    deit_t:4/4:repq deit_t:4/4:repq:qdq
python benchmarks/accuracy.py -o benchmarks/results/recon.md \
    --configs deit_t:4/4:repq deit_t:4/4:repq-recon deit_t:4/4:repq-recon:qdq
python benchmarks/fold_lossless.py --recipe runs/accuracy/deit_t_w4a4_repq.recipe.json \
    -o benchmarks/results/fold_lossless.md
python benchmarks/accuracy.py -o benchmarks/results/ablation.md --configs deit_t:4/4:basic deit_t:4/4:repq-cw
python benchmarks/accuracy.py -o benchmarks/results/ablation_w6a6.md --configs deit_t:6/6:basic deit_t:6/6:repq-cw \
    deit_t:6/6:repq-log2
python benchmarks/accuracy.py -o benchmarks/results/random_weights.md --num-calib 8 \
    --configs swin_t:8/8:repq:random deit_b:8/8:repq:random vit_b:8/8:repq:random
python benchmarks/accuracy.py -o benchmarks/results/ias.md --configs deit_t:3/3:ias deit_t:3/3:ias:qdq:reuse \
    deit_t:4/4:ias deit_t:4/4:ias:qdq:reuse deit_t:6/6:ias deit_t:6/6:ias:qdq:reuse
python benchmarks/accuracy.py -o benchmarks/results/ias_ablation.md --no-sim --configs \
    deit_t:3/3:repq deit_t:3/3:ias-sulq deit_t:3/3:ias-stage3 deit_t:4/4:repq deit_t:4/4:ias-sulq \
    deit_t:4/4:ias-stage3 deit_t:6/6:repq deit_t:6/6:ias-sulq deit_t:6/6:ias-stage3
python benchmarks/sulq_eta.py --bits 3/3 4/4 -o benchmarks/results/sulq_eta.md
python benchmarks/ablation.py -o benchmarks/results/ablation_auto.md
python benchmarks/export_profile.py -o benchmarks/results/export_profile.md
python benchmarks/keep_float.py -o benchmarks/results/keep_float.md
python benchmarks/accuracy.py -o benchmarks/results/mptq.md --configs deit_t:4/4:repq-optm deit_t:4/4:repq-optm:qdq \
    deit_t:4/4:mptq deit_t:4/4:mptq-sqb deit_t:6/6:mptq deit_t:6/6:repq-optm
python benchmarks/mixed_precision.py --avg-bits 5 4 -o benchmarks/results/mixed_precision.md
