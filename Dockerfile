# gpt2-instruct server image: the production stack (nginx in front of gunicorn, as `make serve-prod`),
# serving a checkpoint mounted at /models (a ckpt.pt file or its folder) on port 8000.
#
# CPU (default):  docker build -t gpt2-instruct .
# GPU:            docker build -t gpt2-instruct:gpu \
#                   --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime --build-arg TORCH_SPEC= .
# Run:            docker run --rm -p 8000:8000 -v "$PWD/out/demo/sft:/models:ro" gpt2-instruct
#                 docker run --rm --gpus all -p 8000:8000 -v "$PWD/out/dolly:/models:ro" \
#                   -e GPT2I_ALLOWED_HOSTS=chat.example.org gpt2-instruct:gpu
# The names clients use must be in GPT2I_ALLOWED_HOSTS (localhost and 127.0.0.1 are). TLS: see the
# README's "Production" section (a certificate mounted read-only, nginx.conf's commented server lines).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch from the CPU wheel index by default; empty when the base image already has a CUDA torch.
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/* \
 && if [ -n "$TORCH_SPEC" ]; then pip install $TORCH_SPEC; fi \
 && grep -vE '^(torch|pytest|datasets|matplotlib)==' requirements.txt > /tmp/requirements-serve.txt \
 && pip install -r /tmp/requirements-serve.txt \
 && useradd --create-home --uid 10001 app

# Only what serving needs: the model, its tokenizer, the engine, the server, the page and the two configs.
COPY --chown=app:app model.py tokenizer.py prompt.py checkpoint.py common.py device.py cli.py grammar.py lora.py \
     train_flags.py inference.py serve.py gunicorn.conf.py nginx.conf ./
COPY --chown=app:app engine/ engine/
COPY --chown=app:app server/ server/
COPY --chown=app:app assets/ assets/
COPY --chown=app:app static/ static/

# nginx and gunicorn run as this user: nginx's pid, temp files and gunicorn's socket go to /tmp/gpt2i.
USER app
ENV GPT2I_CKPT=/models GPT2I_NGINX_LISTEN=0.0.0.0:8000 GPT2I_RUN_DIR=/tmp/gpt2i GPT2I_DEVICE=auto
VOLUME ["/models"]
EXPOSE 8000
# A reload or stop gives streams gunicorn's 30 s graceful time: `docker stop -t 40` lets it finish.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1
CMD ["gunicorn", "-c", "gunicorn.conf.py", "serve:create_app()"]
