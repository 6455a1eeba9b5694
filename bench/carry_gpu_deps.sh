#!/usr/bin/env bash
# Fetch, on this machine, what the GPU machine lacks to run the mesh (it has no registry and no
# network): Python wheels into .whl/ (FBGEMM's into .fbgemm/, FlashAttention-3's into .fa3/) and
# Debian's redis-server into .deb/ (all ignored by git; the device call names them in `carry`).
# Idempotent: a file already there is not fetched again.
# bench/gpu_session.sh installs them on the device (wheels: pip --target /tmp/site + PYTHONPATH;
# debs: dpkg -x into /tmp/redisroot, never into /). The list and why: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Missing from the GPU image, or there in a version older than pyproject.toml's pins (grpcio,
# protobuf: the generated code in llmesh/v1 needs a matching runtime). Never torch / numpy /
# triton or anything else the image has and llmesh accepts: they would shadow the image's own.
WHEELS=(
  grpcio==1.85.3
  grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1
  protobuf==7.36.2
  googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-grpc==1.45.2
  importlib-metadata==8.7.1
  redis==8.1.0
  # the router's DNS discovery (Kubernetes) imports it at start
  dnspython==2.9.2
  gguf==0.19.0
  # structured output: xgrammar and what it needs that the image lacks
  xgrammar==0.2.9
  apache-tvm-ffi==0.1.15.post2
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  # the structured-output tests validate answers with jsonschema
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  attrs==26.1.0
)
# Large wheels, each in its own folder so that a call carries only what it runs (a call carries
# 64 MiB with the tracked files): .fbgemm (the `gpu` extra: FBGEMM GenAI's CUTLASS INT4 / FP8
# GEMMs, candidates of the quantized dispatch table; the build for the image's torch 2.11,
# CUDA 13; 36 MB) and .fa3 (FlashAttention-3's forward kernels for Hopper, a candidate of
# dense_causal_attention's measured dispatch: built for CUDA 13 against torch's stable C ABI;
# 28 MB). `.whl` (16 MB) with either fits.
FOLDER_WHEELS=(.fbgemm:fbgemm-gpu-genai==1.6.0 .fa3:fa3-fwd==0.0.3)
# Published as a source distribution only: built into a wheel here (pure Python, Triton kernels).
SDISTS=(
  # the `gpu` extra: GemLite's INT4/INT8 kernels, a candidate of the quantized dispatch table
  gemlite==0.6.0.post2
)
# redis-server 7 from Debian 12 (glibc >= 2.34, so it runs on the image's Ubuntu 24.04) and the
# shared libraries it links that a CUDA image may lack.
DEBS=(redis-server redis-tools libjemalloc2 liblzf1 libatomic1)

mkdir -p .whl .deb
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec#*==}
  stem=$(echo "$name" | tr '-' '_')
  if compgen -G ".whl/${stem}-${version}-*.whl" >/dev/null; then continue; fi
  # A different version of the same package would make pip refuse the whole install.
  rm -f ".whl/${stem}"-[0-9]*.whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
for spec in "${SDISTS[@]}"; do
  name=${spec%%==*}; version=${spec#*==}
  compgen -G ".whl/${name}-${version}-*.whl" >/dev/null && continue
  rm -f ".whl/${name}"-[0-9]*.whl
  $PY -m pip wheel -q --no-deps -w .whl "$spec"
done
for entry in "${FOLDER_WHEELS[@]}"; do
  folder=${entry%%:*}; spec=${entry#*:}
  stem=$(echo "${spec%%==*}" | tr '-' '_')
  mkdir -p "$folder"
  rm -f ".whl/${stem}"-[0-9]*.whl  # where an earlier version of this script put it
  compgen -G "${folder}/${stem}-${spec#*==}-*.whl" >/dev/null && continue
  rm -f "${folder}/${stem}"-[0-9]*.whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$folder" "$spec"
done
missing=()
for pkg in "${DEBS[@]}"; do
  compgen -G ".deb/${pkg}_*.deb" >/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! apt-cache policy redis-server 2>/dev/null | grep -q Candidate; then apt-get update -qq; fi
  (cd .deb && apt-get download -q "${missing[@]}")
fi
# FlashAttention-4 (CuTe DSL kernels with a Hopper forward), a candidate of dense_causal_attention's
# dispatch. The DSL's CUDA-13 library wheel (92 MB, over a device call's 64 MiB carry alone) is
# unpacked, repacked as tar.xz (64 MB; xz -9 takes minutes here) and split: .fa4 holds the first
# 48 MB, .fa4b the rest and the other wheels (26 MB). With the tracked files a call carries
# 64 MiB, so each goes alone, in back-to-back calls; bench/gpu_session.sh joins the parts.
# Opt-in (FA4=1): only the fa4 columns of bench/kernels_gpu.py use it.
if [ "${FA4:-0}" = 1 ]; then
  FA4_WHEELS=(flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
    nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5
    apache-tvm-ffi==0.1.15.post2)
  FA4_LIBS=nvidia-cutlass-dsl-libs-cu13==4.8.1
  mkdir -p .fa4 .fa4b
  for spec in "${FA4_WHEELS[@]}"; do
    stem=$(echo "${spec%%==*}" | tr '-' '_')
    compgen -G ".fa4b/${stem}-${spec#*==}-*.whl" >/dev/null && continue
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .fa4b "$spec"
  done
  if [ ! -s .fa4/libs_cu13.tar.xz.part0 ] || [ ! -s .fa4b/libs_cu13.tar.xz.part1 ]; then
    tmp=$(mktemp -d)
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$tmp" "$FA4_LIBS"
    (cd "$tmp" && $PY -m zipfile -e ./*.whl unpacked && cd unpacked && tar -cf - . | xz -T0 -9 > "$tmp/libs.tar.xz")
    head -c 48000000 "$tmp/libs.tar.xz" > .fa4/libs_cu13.tar.xz.part0
    tail -c +48000001 "$tmp/libs.tar.xz" > .fa4b/libs_cu13.tar.xz.part1
    rm -rf "$tmp"
  fi
fi
ls -1 .whl .deb .fbgemm .fa3
du -sch .whl .deb | tail -1
du -sh .fbgemm .fa3
[ "${FA4:-0}" = 1 ] && du -sch .fa4 .fa4b
exit 0
