# gpt2-instruct server image: serves a checkpoint mounted at /models (a ckpt.pt file or its folder).
#
# CPU (default):  docker build -t gpt2-instruct .
# GPU:            docker build -t gpt2-instruct:gpu \
#                   --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime --build-arg TORCH_SPEC= .
# Run:            docker run --rm -p 5000:5000 -v "$PWD/out/demo/sft:/models:ro" gpt2-instruct
#                 docker run --rm --gpus all -p 5000:5000 -v "$PWD/out/dolly:/models:ro" gpt2-instruct:gpu
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch from the CPU wheel index by default; empty when the base image already has a CUDA torch.
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN if [ -n "$TORCH_SPEC" ]; then pip install $TORCH_SPEC; fi \
 && grep -vE '^(torch|pytest|datasets|matplotlib)==' requirements.txt > /tmp/requirements-serve.txt \
 && pip install -r /tmp/requirements-serve.txt \
 && useradd --create-home --uid 10001 app

# Only what serving needs: the model, its tokenizer, the engine, the server and the page.
COPY --chown=app:app model.py tokenizer.py prompt.py checkpoint.py common.py inference.py serve.py gunicorn.conf.py ./
COPY --chown=app:app assets/ assets/
COPY --chown=app:app static/ static/

USER app
ENV GPT2I_CKPT=/models GPT2I_BIND=0.0.0.0:5000 GPT2I_DEVICE=auto
VOLUME ["/models"]
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)" || exit 1
CMD ["gunicorn", "-c", "gunicorn.conf.py", "serve:create_app()"]
