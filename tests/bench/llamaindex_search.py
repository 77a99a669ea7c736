"""`echod bench search` baseline (B4 index, B5 query): LlamaIndex over exactly the
chunks and vectors Echo indexes, as a user would set it up for hybrid retrieval:
BM25Retriever (bm25s, English stemmer) and a VectorStoreIndex (SimpleVectorStore) over
TextNodes that carry their precomputed all-MiniLM-L6-v2 vectors, fused by reciprocal
rank (QueryFusionRetriever, mode reciprocal_rerank, one query), top k. Query vectors
are precomputed too (looked up by an embedding class), so neither side pays for
embedding here: B3 measures that.

Usage: llamaindex_search.py MANIFEST.json
MANIFEST: {"chunks": texts.jsonl, "vectors": f32 file, "dimension", "sizes": [n, ...],
           "queries": queries.jsonl, "query_vectors": f32 file, "k", "max_queries"}
Prints one JSON line: {"runs": [{"chunks", "index_seconds", "query_seconds": [...]}]}.
"""
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import numpy as np
from llama_index.core import Settings, StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.core.schema import TextNode
from llama_index.retrievers.bm25 import BM25Retriever

manifest = json.load(open(sys.argv[1]))
dimension, k = manifest["dimension"], manifest["k"]
texts = [json.loads(line) for line in open(manifest["chunks"])]
vectors = np.fromfile(manifest["vectors"], dtype="<f4").reshape(-1, dimension)
queries = [json.loads(line) for line in open(manifest["queries"])][: manifest["max_queries"]]
query_vectors = np.fromfile(manifest["query_vectors"], dtype="<f4").reshape(-1, dimension)
by_query = {q: query_vectors[i].tolist() for i, q in enumerate(queries)}


class Precomputed(BaseEmbedding):
    """The query vectors Echo uses, looked up by text (no model runs here)."""

    def _get_query_embedding(self, query):
        return by_query[query]

    async def _aget_query_embedding(self, query):
        return by_query[query]

    def _get_text_embedding(self, text):
        raise RuntimeError("every node carries its embedding")


Settings.llm = None
Settings.embed_model = Precomputed()
runs = []
for size in manifest["sizes"]:
    nodes = [TextNode(text=texts[i], id_=f"c{i}", embedding=vectors[i].tolist()) for i in range(size)]
    started = time.perf_counter()
    bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=k, language="english")
    index = VectorStoreIndex(nodes, show_progress=False)
    index_seconds = time.perf_counter() - started
    fusion = QueryFusionRetriever([index.as_retriever(similarity_top_k=k), bm25], similarity_top_k=k, num_queries=1, mode="reciprocal_rerank", use_async=False)
    fusion.retrieve(queries[0])
    latencies = []
    for query in queries:
        started = time.perf_counter()
        fusion.retrieve(query)
        latencies.append(time.perf_counter() - started)
    runs.append({"chunks": size, "index_seconds": index_seconds, "query_seconds": latencies})
    del nodes, bm25, index, fusion
print(json.dumps({"runs": runs}))
