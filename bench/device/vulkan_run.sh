#!/usr/bin/env bash
# Issue 12 on the GPU machine: the Vulkan build (WGSL through wgpu-native on NVIDIA's Vulkan driver)
# beside the CUDA build of the same model, in one run.
# Usage: bash bench/device/vulkan_run.sh prepare      (build machine: Vulkan loader debs into .gl,
#          wgpu + cffi wheels for Python 3.12 into .carry/vk, libraries into .carry/vkrun)
#        bash bench/device/vulkan_run.sh setup        (device; unpacks what the call carried of .gl,
#          .carry/vk, .carry/site312.tgz, .carry/vkrun and .carry/w1 under / and /tmp: one transfer
#          holds 64 MiB with the tree, so calls of `setup` carry .gl .carry/vk .carry/w1, then
#          .carry/site312.tgz .carry/vkrun)
#        bash bench/device/vulkan_run.sh run OUT_DIR  (device, next on the same machine; carry .carry/w2)
# With SmolLM2's GGUF assembled at /tmp/smollm2.gguf (bench/device/run.sh's two transfers: /tmp/w1.part
# from a call before, .carry/w2 carried) it first checks Vulkan float16 against the CPU's float32
# library on real text (`tsedge bench accuracy`, .carry/vkrun/acc: dense, and TokenSelect selecting from
# token 208). Llama-3-8B shapes run at depths 0 and 4K only: at 32K its KV cache (4.3 GB) is one tensor, over
# the 4 GiB buffer limit of the adapter (the KV cache is not split per layer yet).
# A shorter run: VK_PRESETS (default "smollm2-135m llama3-8b"), VK_TARGETS (default "vulkan cuda:sm_90a";
# either empty: no speed libraries) and VK_ACCURACY=0 (skip the accuracy libraries) at prepare; `run`
# times the libraries prepared.
set -uo pipefail
SMOL_DEPTHS=0,4k,32k
LLAMA_DEPTHS=0,4k
PRESETS=${VK_PRESETS-smollm2-135m llama3-8b}
TARGETS=${VK_TARGETS-vulkan cuda:sm_90a}
LIBS=.carry/vkrun
if [ "$1" = prepare ]; then
  mkdir -p .gl .carry/vk /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .carry/vk \
    "wgpu>=0.32,<0.33" cffi pycparser rendercanvas sniffio
  for t in llvm vulkan; do  # the accuracy check's libraries (TokenSelect with budgets 16/64/128)
    [ "${VK_ACCURACY:-1}" = 0 ] && break
    tsedge compile --target $t --quantization q0 --max-context 1024 -o $LIBS/acc/dense-$t.so
    tsedge compile --target $t --quantization q0 --max-context 1024 --policy tokenselect --n-init 16 --n-local 64 --select-top-k 128 \
      --chunk-size 64 -o $LIBS/acc/ts-$t.so
  done
  for target in $TARGETS; do
    t=${target%%:*}
    for preset in $PRESETS; do
      depths=$SMOL_DEPTHS; [ $preset = llama3-8b ] && depths=$LLAMA_DEPTHS
      python -m tsedge.cli_bench decode --compile-only --lib-dir $LIBS/$preset-$t --target $target \
        --preset $preset --depths $depths
    done
  done
  exit 0
fi
if [ "$1" = setup ]; then
  if [ -d .gl ]; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
  if [ -d .carry/vk ]; then mkdir -p /tmp/vkpkg && for w in .carry/vk/*.whl; do python3 -m zipfile -e "$w" /tmp/vkpkg; done; fi
  if [ -f .carry/site312.tgz ]; then mkdir -p /tmp/site && tar xzf .carry/site312.tgz -C /tmp/site; fi
  if [ -d .carry/vkrun ]; then rm -rf /tmp/vkrun && cp -r .carry/vkrun /tmp/vkrun; fi
  if [ -f .carry/w1/part ]; then cp .carry/w1/part /tmp/w1.part; fi
  ls -d /tmp/vkpkg /tmp/site /tmp/vkrun /tmp/w1.part 2>/dev/null
  exit 0
fi
out=$2
mkdir -p "$out" /tmp/pkg/tsedge
cp -r tsedge/. /tmp/pkg/tsedge/ && for d in models tir_kernels compile; do cp -r "$d" /tmp/pkg/tsedge/; done
export PYTHONPATH=/tmp/vkpkg:/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
repo=$PWD
LIBS=/tmp/vkrun  # unpacked by `setup`
cd /tmp
python3 -c "from tsedge import vulkan; print('adapter:', vulkan.describe())" 2>&1 | tail -1
if [ -f /tmp/w1.part ] && [ -f "$repo/.carry/w2/part" ]; then cat /tmp/w1.part "$repo/.carry/w2/part" > /tmp/smollm2.gguf; fi
if [ -f /tmp/smollm2.gguf ]; then
  for p in dense ts; do
    policy=""; [ $p = ts ] && policy="--policy tokenselect --n-init 16 --n-local 64 --select-top-k 128 --chunk-size 64"
    python3 -m tsedge.cli bench accuracy --model /tmp/smollm2.gguf --lib "$LIBS/acc/$p-vulkan.so" \
      --reference-lib "$LIBS/acc/$p-llvm.so" --quantization q0 --max-context 1024 $policy \
      -o "$out/vulkan_vs_cpu_smollm2_$p.json" 2>&1 | tail -2
  done
fi
for preset in smollm2-135m llama3-8b; do
  depths=$SMOL_DEPTHS; [ $preset = llama3-8b ] && depths=$LLAMA_DEPTHS
  for t in vulkan cuda; do
    [ -d "$LIBS/$preset-$t" ] || continue  # not prepared (VK_PRESETS, VK_TARGETS)
    python3 -m tsedge.cli_bench decode --lib-dir "$LIBS/$preset-$t" --preset $preset --depths $depths \
      --steps 16 -o "$out" --tag "decode_${preset}_${t}_h200" 2> "$out/decode-$preset-$t.log" | tail -6
    python3 -m tsedge.cli_bench prefill --lib-dir "$LIBS/$preset-$t" --preset $preset --depths 0,4k \
      -o "$out" --tag "prefill_${preset}_${t}_h200" 2> "$out/prefill-$preset-$t.log" | tail -4
  done
done
python3 "$repo/bench/device/vulkan_profile.py" "$LIBS/smollm2-135m-vulkan/dense.so" "$out/vulkan_steps_smollm2.json" \
  4096 16 2>&1 | tail -1  # the step as it runs
TSEDGE_VULKAN_PROFILE=1 python3 "$repo/bench/device/vulkan_profile.py" "$LIBS/smollm2-135m-vulkan/dense.so" \
  "$out/vulkan_profile_smollm2.json" 4096 16 2>&1 | tail -1  # each dispatch alone: where the time goes
(cd "$out" && tar czf vulkan_run.tgz --remove-files -- *)  # one file back (the transfer counts files)
