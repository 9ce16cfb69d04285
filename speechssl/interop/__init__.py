"""Interoperability: import fairseq / transformers / torchaudio / fairseq2 checkpoints, export to
transformers / torchaudio / fairseq2 / ONNX, and layer-wise feature extraction.

Modules: :mod:`~speechssl.interop.unpickle` (restricted unpickler for fairseq ``.pt`` files),
:mod:`~speechssl.interop.fairseq`, :mod:`~speechssl.interop.hf`, :mod:`~speechssl.interop.torchaudio_io`,
:mod:`~speechssl.interop.fairseq2`, :mod:`~speechssl.interop.onnx` (one per toolkit),
:mod:`~speechssl.interop.common` (checkpoint in/out), :mod:`~speechssl.interop.names` (parameter names),
:mod:`~speechssl.interop.cli` (``speechssl import`` / ``speechssl export``) and
:mod:`~speechssl.interop.extract` (``speechssl extract``).
"""
