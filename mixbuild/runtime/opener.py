"""What a model directory is, which backend opens it, and the options that cannot apply to it.

One place for `load` (and so `mixbuild run` and `mixbuild serve`), `mixbuild validate` and
`mixbuild inspect`: each resolves its MODEL_DIR here and gets the same answer and the same
refusals, and only then builds the runner it needs.

    kind            what is in the directory                         backend
    ARTIFACT        mixbuild.json + model.onnx (+ model.onnx.data)    ort
    ENGINE          engine.plan + engine.json                         trt
    HF_QUANTIZED    config.json + mixbuild_checkpoint.json            torch (float32, CPU)
                    (`mixbuild export --format hf | hf-modelopt`)
    CHECKPOINT      config.json + *.safetensors                       torch
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from mixbuild.contract import (
    ACCURACY_LEVELS,
    DATA_FILE,
    ENGINE_MANIFEST_FILE,
    HF_CONFIG_FILE,
    HF_MANIFEST_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    PLAN_FILE,
    Backend,
    Device,
    Layout,
)
from mixbuild.errors import ArtifactError, UsageError


class ModelKind(Enum):
    ARTIFACT = f"an ONNX artifact directory ({MANIFEST_FILE} + {ONNX_FILE} + {DATA_FILE})"
    ENGINE = f"a TensorRT engine directory ({PLAN_FILE} + {ENGINE_MANIFEST_FILE})"
    HF_QUANTIZED = (f"a quantized Hugging Face checkpoint written by `mixbuild export --format hf` "
                    f"({HF_CONFIG_FILE} + {HF_MANIFEST_FILE})")
    CHECKPOINT = f"a Hugging Face checkpoint directory ({HF_CONFIG_FILE} + *.safetensors)"

    @property
    def backend(self) -> Backend:
        return _BACKEND[self]


_BACKEND = {ModelKind.ARTIFACT: Backend.ORT, ModelKind.ENGINE: Backend.TRT,
            ModelKind.HF_QUANTIZED: Backend.TORCH, ModelKind.CHECKPOINT: Backend.TORCH}

# What each backend opens, for error messages.
OPENS = {Backend.ORT: ModelKind.ARTIFACT.value, Backend.TRT: ModelKind.ENGINE.value,
         Backend.TORCH: f"{ModelKind.CHECKPOINT.value}, or {ModelKind.HF_QUANTIZED.value}"}


@dataclass(frozen=True)
class ModelDir:
    """A model directory and what it holds, decided from its files alone (nothing is loaded)."""

    path: Path
    kind: ModelKind

    @staticmethod
    def classify(path: str | Path) -> ModelKind | None:
        """The kind of directory `path` is, None when it is none of them (or no directory)."""
        path = Path(path)
        if not path.is_dir():
            return None
        if (path / MANIFEST_FILE).is_file():
            return ModelKind.ARTIFACT
        if (path / ENGINE_MANIFEST_FILE).is_file():   # a missing plan is the engine opener's error
            return ModelKind.ENGINE
        if (path / HF_CONFIG_FILE).is_file():
            quantized = (path / HF_MANIFEST_FILE).is_file()
            return ModelKind.HF_QUANTIZED if quantized else ModelKind.CHECKPOINT
        return None

    @classmethod
    def resolve(cls, path: str | Path) -> ModelDir:
        path = Path(path)
        kind = cls.classify(path)
        if kind is not None:
            return cls(path, kind)
        expected = " or ".join(kind.value for kind in ModelKind)
        if not path.is_dir():
            raise ArtifactError(f"model directory not found: {path}", expected=expected)
        raise ArtifactError(f"{path} is not a model directory mixbuild can run", expected=expected,
                            found=", ".join(sorted(p.name for p in path.iterdir())[:8])
                            or "an empty directory")

    @property
    def backend(self) -> Backend:
        return self.kind.backend

    def layout(self) -> Layout | None:
        """The KV-cache layout an artifact or engine was made with (its manifest's "layout",
        concat when absent: manifests older than the serving layout), read without loading the
        model; None for checkpoints, whose layout the torch backend chooses when it loads."""
        if self.kind is ModelKind.ARTIFACT:
            from mixbuild.exporter.manifest import read_manifest

            return read_manifest(self.path).layout
        if self.kind is ModelKind.ENGINE:
            from mixbuild.builder.manifest import read_engine_manifest

            return read_engine_manifest(self.path).layout
        return None

    def choose(self, backend: Backend | str, device: Device | str, accuracy_level: int = 1,
               verb: str = "open") -> Backend:
        """The backend that runs this directory for `backend` ("auto" or a name) on `device`,
        or the usual clear refusal of a combination that cannot work; `verb` names the command's
        action in the message ("open", "validate")."""
        backend, device = Backend(backend), Device(device)
        chosen = self.backend if backend is Backend.AUTO else backend
        if chosen is not self.backend:
            raise UsageError(f"the {chosen.value} backend cannot {verb} {self.path}",
                             expected=f"backend '{chosen.value}' opens {OPENS[chosen]}",
                             found=f"{self.path} is {self.kind.value}",
                             hint=f"use backend='{self.backend.value}' (--backend "
                                  f"{self.backend.value}) or auto")
        if accuracy_level not in ACCURACY_LEVELS or (accuracy_level != 1 and chosen is not Backend.ORT):
            raise UsageError(f"--accuracy-level {accuracy_level} cannot apply to {self.path}: the "
                             "accuracy level is an option of ONNX Runtime's int4 kernels, not of "
                             f"the {chosen.value} backend",
                             expected=" or ".join(map(str, ACCURACY_LEVELS)) + " with the ort "
                                      "backend (ONNX Runtime's int4 kernels); 1 elsewhere",
                             found=f"accuracy_level={accuracy_level}, the {chosen.value} backend",
                             hint="drop the accuracy level, or run an int4 ONNX artifact")
        if chosen is Backend.TRT and device is Device.CPU:
            raise UsageError("the trt backend runs TensorRT engines on a CUDA GPU",
                             found="device 'cpu'", hint="pass device 'cuda'")
        if self.kind is ModelKind.HF_QUANTIZED and device is not Device.CPU:
            raise UsageError("a quantized Hugging Face checkpoint runs in mixbuild in float32 on "
                             "the CPU (its dequantized weights, the engines' numerics)",
                             found=f"device '{device.value}'",
                             hint="pass device 'cpu', or serve it on the GPU with vLLM, SGLang "
                                  "or TensorRT-LLM")
        if device is Device.CUDA and chosen is Backend.TORCH:
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"device 'cuda' was asked for the {chosen.value} backend, but "
                                 "torch sees no CUDA GPU", hint="pass device 'cpu'")
        return chosen
