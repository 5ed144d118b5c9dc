"""int8 student: ONNX Runtime's static post-training quantisation of an exported file (QDQ,
per-channel int8 weights, uint8 activations, min-max calibration on training images), with its
accuracy and latency next to the fp32 file's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from relkd.deploy.ort import ort_latency, ort_logits, ort_session, quiet, topk_stats


class _Reader:
    """ORT's calibration data reader over float [M, C, H, W] images in [0, 1]."""

    def __init__(self, name: str, images: torch.Tensor, batch: int) -> None:
        self.name, self.images, self.batch, self.i = name, images, batch, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        x = self.images[self.i : self.i + self.batch].float().contiguous().numpy()
        self.i += self.batch
        return {self.name: x}

    def rewind(self) -> None:
        self.i = 0


def quantize(
    fp32: Path,
    shape: tuple[int, int, int],
    calibration: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    fp32_sess,
) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):
        pass

    dst = fp32.with_name(fp32.stem + ".int8.onnx")
    pre = fp32.with_name(f".{fp32.stem}.pre.onnx")
    inp = fp32_sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    try:
        with quiet():
            try:  # shape inference + graph optimisation, as ORT recommends before quantising
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
                src = pre
            except Exception:
                src = fp32
            quantize_static(
                str(src), str(dst), Reader(inp.name, calibration, fixed or 32),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)
        for extra in fp32.parent.glob("augmented_model*.onnx"):
            extra.unlink(missing_ok=True)
    import onnx

    m = onnx.load(str(dst))
    del m.metadata_props[:]
    m.metadata_props.extend(onnx.load(str(fp32), load_external_data=False).metadata_props)
    entry = m.metadata_props.add()
    entry.key, entry.value = "quantization", "int8 static QDQ (onnxruntime), per-channel weights"
    onnx.save(m, str(dst))
    int8_sess = ort_session(dst)
    rec: dict[str, Any] = {
        "file": dst.name,
        "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 "
        "activations, min-max calibration",
        "calibration_images": len(calibration),
        "bytes_fp32": fp32.stat().st_size,
        "bytes_int8": dst.stat().st_size,
    }
    q = ort_logits(int8_sess, images)
    f = ort_logits(fp32_sess, images)
    rec["top1_agreement_with_fp32"] = float((q.argmax(1) == f.argmax(1)).float().mean())
    if labels is not None:
        rec["fp32_top1"] = topk_stats(f, labels)["top1"]
        rec["int8_top1"] = topk_stats(q, labels)["top1"]
        rec["eval_images"] = len(labels)
    rec["fp32_latency"] = ort_latency(fp32_sess, shape)
    rec["int8_latency"] = ort_latency(int8_sess, shape)
    return rec
