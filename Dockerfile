# dicom-node as a container: `dicom-node serve` (the DIMSE node) by default, `dicom-node infer` for file mode.
#
#   docker build -t dicom-node .
#   docker run -d --name dicom-node -p 11112:11112 \
#     -v dicom-node-state:/var/lib/dicom-node \
#     -v /srv/dicom-node/etc:/etc/dicom-node:ro \
#     -v /srv/dicom-node/models:/opt/dicom-node/models:ro \
#     dicom-node
#   docker run --rm -v "$PWD/in:/input:ro" -v "$PWD/out:/output" dicom-node \
#     dicom-node infer --settings /etc/dicom-node/node.yaml
#
# No torch: inference runs on ONNX Runtime in-process, or on a Triton server the config points at.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DICOM_NODE_INFER_INPUT=/input \
    DICOM_NODE_INFER_OUTPUT=/output \
    DICOM_NODE_INFER_PUBLISH=/publish

# A dedicated, unprivileged user owns the state; the node never needs root (port 11112, not 104).
RUN groupadd --system --gid 10001 dicom-node \
 && useradd --system --uid 10001 --gid dicom-node --home-dir /var/lib/dicom-node --shell /usr/sbin/nologin dicom-node

WORKDIR /opt/dicom-node/src
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY inference ./inference
RUN pip install --no-cache-dir . \
 && rm -rf /opt/dicom-node/src

# Defaults that the /etc/dicom-node and models volumes may replace.
COPY deploy/node.yaml /etc/dicom-node/node.yaml
COPY config/config_inference.json /etc/dicom-node/config_inference.json
COPY models /opt/dicom-node/models

RUN mkdir -p /var/lib/dicom-node /input /output /publish \
 && chown -R dicom-node:dicom-node /var/lib/dicom-node /output /publish

USER dicom-node
WORKDIR /var/lib/dicom-node
VOLUME ["/var/lib/dicom-node"]
EXPOSE 11112

# A C-ECHO to the node itself. With node.allowed_calling_ae_titles set, add HEALTHCHECK to that list.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD python -m pynetdicom echoscu -aet HEALTHCHECK -aec "${DICOM_NODE__NODE__AE_TITLE:-COVIDSEG}" 127.0.0.1 11112 || exit 1

# SIGTERM (docker stop) drains: no new associations, stores in flight finish, jobs and exports resume on restart.
STOPSIGNAL SIGTERM
CMD ["dicom-node", "serve", "--config", "/etc/dicom-node/node.yaml"]
