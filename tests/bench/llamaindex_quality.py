"""`echod bench quality` baselines: LlamaIndex over the same files, as a user would set
it up. HTML pages are read with BeautifulSoup (text of the page), PDFs with pypdf one
document per physical page (what LlamaIndex's PDFReader does), split by
SentenceSplitter(512, 50). Two retrievers:

- llamaindex-bm25: BM25Retriever (bm25s, English stemmer), top 10;
- llamaindex-fusion: the same BM25 and a VectorStoreIndex with all-MiniLM-L6-v2
  (HuggingFaceEmbedding, the same model files Echo uses), fused by reciprocal rank
  (QueryFusionRetriever, mode reciprocal_rerank, one query), top 10.

Usage: llamaindex_quality.py MANIFEST.json OUT.json
MANIFEST: {"dir", "files": [relative paths], "questions": [text], "model_dir", "k"}.
OUT: {"systems": {name: [[{"file", "page", "text"}, ...] per question]}, "nodes", "seconds"}.
"""
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

from bs4 import BeautifulSoup
from pypdf import PdfReader
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.retrievers.bm25 import BM25Retriever

manifest = json.load(open(sys.argv[1]))
out_path = sys.argv[2]
root, k = manifest["dir"], manifest.get("k", 10)
Settings.llm = None

started = time.perf_counter()
documents = []
for rel in manifest["files"]:
    path = os.path.join(root, rel)
    lower = rel.lower()
    if lower.endswith(".pdf"):
        reader = PdfReader(path)
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            if text.strip():
                documents.append(Document(text=text, metadata={"file": rel, "page": number}))
    elif lower.endswith((".html", ".htm")):
        with open(path, "rb") as f:
            soup = BeautifulSoup(f.read(), "html.parser")
        text = soup.get_text(" ", strip=True)
        if text:
            documents.append(Document(text=text, metadata={"file": rel, "page": None}))
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            documents.append(Document(text=text, metadata={"file": rel, "page": None}))
for document in documents:
    document.excluded_embed_metadata_keys = ["file", "page"]
    document.excluded_llm_metadata_keys = ["file", "page"]
nodes = SentenceSplitter(chunk_size=512, chunk_overlap=50).get_nodes_from_documents(documents)
read_seconds = time.perf_counter() - started

started = time.perf_counter()
bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=k, language="english")
bm25_seconds = time.perf_counter() - started

started = time.perf_counter()
Settings.embed_model = HuggingFaceEmbedding(model_name=manifest["model_dir"], device="cpu", embed_batch_size=32)
index = VectorStoreIndex(nodes, show_progress=False)
vector = index.as_retriever(similarity_top_k=k)
embed_seconds = time.perf_counter() - started
fusion = QueryFusionRetriever([vector, bm25], similarity_top_k=k, num_queries=1, mode="reciprocal_rerank", use_async=False)


def ranked(retriever, question):
    return [{"file": hit.node.metadata.get("file"), "page": hit.node.metadata.get("page"), "text": hit.node.get_content()} for hit in retriever.retrieve(question)[:k]]


systems = {"llamaindex-bm25": [], "llamaindex-fusion": []}
query_seconds = {}
for name, retriever in [("llamaindex-bm25", bm25), ("llamaindex-fusion", fusion)]:
    started = time.perf_counter()
    for question in manifest["questions"]:
        systems[name].append(ranked(retriever, question))
    query_seconds[name] = time.perf_counter() - started

json.dump({"systems": systems, "nodes": len(nodes)}, open(out_path, "w"))
print(json.dumps({"nodes": len(nodes), "documents": len(documents), "seconds": {"read_split": read_seconds, "bm25_index": bm25_seconds, "embed_index": embed_seconds, "queries": query_seconds}}))
