# NGC PyTorch base (CUDA, NCCL, apex/FusedAdam; Python 3.12). Building needs access to nvcr.io, which CI
# here lacks. constraints.txt resolves for Python 3.12: tools/resolve_for_python.sh 3.12 (pip's resolver
# for that Python, run from this Python 3.11 machine).
ARG NGC_TAG=26.07-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

WORKDIR /opt/nemo-aligner-draft
COPY setup.py constraints.txt README.md ./
COPY nemo_aligner_draft ./nemo_aligner_draft
COPY conf ./conf
COPY examples ./examples
# Keep the image's own CUDA build of torch: install the package without touching torch/torchvision.
RUN grep -v -E '^(torch|torchvision)==' constraints.txt > /tmp/constraints-ngc.txt \
 && pip install --no-cache-dir -c /tmp/constraints-ngc.txt -e '.[test]'

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENTRYPOINT ["python", "examples/mm/stable_diffusion/train_sd_draftp.py"]
CMD ["--config-path=conf", "--config-name=draftp_sd"]
