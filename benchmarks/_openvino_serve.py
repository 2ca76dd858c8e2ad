"""A timing worker for OpenVINO, speaking the protocol of ``python -m pqv_lightning.export.probe serve``.

``python benchmarks/_openvino_serve.py MODEL.onnx --shape 1,3,224,224 --threads 2 --warmup 5``: reads the file with
OpenVINO's defaults (``Core().compile_model(path, "CPU")``; only ``INFERENCE_NUM_THREADS`` is fixed, as for every
runtime in the benchmarks), prints the ready line, then answers each line ``n`` on stdin with one untimed and ``n``
timed calls. A peer, not part of the package: OpenVINO is an optional extra (``pip install .[benchmarks]``).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import openvino as ov

from pqv_lightning.export.probe import serve_requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--shape", required=True, type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args()
    compiled = ov.Core().compile_model(args.path, "CPU", {"INFERENCE_NUM_THREADS": args.threads})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(args.shape, dtype=np.float32)
    request.set_input_tensor(ov.Tensor(x))
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    serve_requests(request.infer, args.warmup, json.dumps({"inference_precision": str(hint)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
