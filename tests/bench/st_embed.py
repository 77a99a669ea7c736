"""B3 baseline: sentence-transformers embeds the same chunk texts Echo embeds.

Usage: st_embed.py TEXTS.jsonl MODEL_DIR OUT.f32 BATCH
Reads one JSON string per line, embeds them (fp32, CPU, every core), writes the
vectors as little-endian f32 rows, and prints one JSON line with the timing
(model load and a warm-up excluded, as for Echo).
"""
import json
import os
import sys
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

texts_path, model_dir, out_path, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = [json.loads(line) for line in open(texts_path, encoding="utf-8")]
torch.set_num_threads(os.cpu_count() or 1)
model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = 256
model.encode(texts[:8], batch_size=batch)
started = time.perf_counter()
vectors = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
elapsed = time.perf_counter() - started
np.asarray(vectors, dtype="<f4").tofile(out_path)
print(json.dumps({"texts": len(texts), "seconds": elapsed, "threads": torch.get_num_threads(), "torch": torch.__version__}))
