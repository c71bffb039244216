# The user-code image for Kubernetes: the di_assets code location, a CUDA build of torch,
# dagster-k8s (the step executor) and dagster-postgres (the Helm chart's instance storage).
# The same image serves the gRPC code server, the run pods and the GPU step pods.
#
#   docker build -t registry.example.com/di-assets:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DI_ASSETS_CACHE=/opt/dagster/cache

WORKDIR /opt/dagster/app

# torch first, in its own layer: it is most of the image and rarely changes. PyPI's Linux x86_64
# wheels are CUDA builds (the CUDA runtime comes as nvidia-* wheels); the node needs only the
# NVIDIA driver and device plugin. For another CUDA version, add
# --index-url https://download.pytorch.org/whl/cu<version>.
COPY constraints.txt ./
RUN pip install -c constraints.txt torch torchvision

COPY pyproject.toml setup.py README.md ./
COPY di_assets ./di_assets
RUN pip install -c constraints.txt ".[k8s,postgres]"

# The Helm chart runs `dagster api grpc -m di_assets.definitions` in this image; a plain
# `docker run` serves the same code location.
EXPOSE 3030
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", "di_assets.definitions"]
