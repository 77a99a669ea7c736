"""`echod bench answers` (B9) baseline: LlamaIndex's query engine over the same files,
as a user would set it up: HTML read with BeautifulSoup, SentenceSplitter(512, 50),
BM25Retriever + VectorStoreIndex (all-MiniLM-L6-v2, the same model files) fused by
reciprocal rank, `OpenAILike` pointed at the same stub LLM Echo uses, streaming
responses. `clients` threads answer the questions; each records the time from its
query to the first streamed token.

Usage: llamaindex_answers.py MANIFEST.json
MANIFEST: {"dir", "files", "questions", "warm", "model_dir", "llm_url", "clients", "k"}.
Prints one JSON line: {"first_token_ms": [...], "seconds": wall time of the timed run}.
"""
import json
import os
import queue
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore")

from bs4 import BeautifulSoup
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.llms.openai_like import OpenAILike
from llama_index.retrievers.bm25 import BM25Retriever

manifest = json.load(open(sys.argv[1]))
root, k = manifest["dir"], manifest.get("k", 8)
documents = []
for rel in manifest["files"]:
    with open(os.path.join(root, rel), "rb") as f:
        text = BeautifulSoup(f.read(), "html.parser").get_text(" ", strip=True)
    if text:
        documents.append(Document(text=text, metadata={"file": rel}))
nodes = SentenceSplitter(chunk_size=512, chunk_overlap=50).get_nodes_from_documents(documents)
Settings.embed_model = HuggingFaceEmbedding(model_name=manifest["model_dir"], device="cpu", embed_batch_size=32)
llm = OpenAILike(model="stub", api_base=manifest["llm_url"], api_key="stub", is_chat_model=True, timeout=120, max_retries=0)
Settings.llm = llm
bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=k, language="english")
index = VectorStoreIndex(nodes, show_progress=False)
fusion = QueryFusionRetriever([index.as_retriever(similarity_top_k=k), bm25], similarity_top_k=k, num_queries=1, mode="reciprocal_rerank", use_async=False)
engine = RetrieverQueryEngine.from_args(fusion, llm=llm, streaming=True)


def first_token_ms(question):
    started = time.perf_counter()
    response = engine.query(question)
    first = None
    for _ in response.response_gen:
        if first is None:
            first = (time.perf_counter() - started) * 1000.0
    return first if first is not None else (time.perf_counter() - started) * 1000.0


for question in manifest["warm"]:
    first_token_ms(question)

work = queue.Queue()
for question in manifest["questions"]:
    work.put(question)
results, lock = [], threading.Lock()


def client():
    while True:
        try:
            question = work.get_nowait()
        except queue.Empty:
            return
        measured = first_token_ms(question)
        with lock:
            results.append(measured)


started = time.perf_counter()
threads = [threading.Thread(target=client) for _ in range(manifest["clients"])]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"first_token_ms": results, "seconds": time.perf_counter() - started}))
