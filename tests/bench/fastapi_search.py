"""`echod bench api` baseline (B7): what a user would put behind an API instead of Echo —
FastAPI + PyJWT verifying Echo's own RS256 access token against its JWKS (issuer,
audience, expiry, algorithm allow-list), a Python policy check (the scope and the
caller's readable collections), and LlamaIndex's BM25Retriever over the same HTML
manual (SentenceSplitter 512/50), top k with the chunk text. One uvicorn worker.

Usage: fastapi_search.py MANIFEST.json PORT
MANIFEST: {"dir", "files": [relative html paths], "jwks_url", "issuer", "audience"}.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import jwt
import uvicorn
from bs4 import BeautifulSoup
from fastapi import FastAPI, Header, HTTPException
from llama_index.core import Document, Settings
from llama_index.core.node_parser import SentenceSplitter
from llama_index.retrievers.bm25 import BM25Retriever
from pydantic import BaseModel

manifest = json.load(open(sys.argv[1]))
port = int(sys.argv[2])
Settings.llm = None
documents = []
for rel in manifest["files"]:
    with open(os.path.join(manifest["dir"], rel), "rb") as f:
        text = BeautifulSoup(f.read(), "html.parser").get_text(" ", strip=True)
    if text:
        documents.append(Document(text=text, metadata={"file": rel, "collection": "manual"}))
nodes = SentenceSplitter(chunk_size=512, chunk_overlap=50).get_nodes_from_documents(documents)
retriever = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=10, language="english")
jwks = jwt.PyJWKClient(manifest["jwks_url"], cache_keys=True)
# The policy: which collections each org's members may read.
READABLE = {"bench": {"manual"}}

app = FastAPI()


class Search(BaseModel):
    query: str
    k: int = 10


@app.get("/healthz")
def healthz():
    return {"ok": True}


@app.post("/api/v1/search")
def search(body: Search, authorization: str = Header(default="")):
    if not authorization.startswith("Bearer "):
        raise HTTPException(401, "a bearer token is required")
    token = authorization[7:]
    try:
        key = jwks.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=manifest["audience"], issuer=manifest["issuer"], options={"require": ["exp", "iat", "sub"]})
    except jwt.PyJWTError as error:
        raise HTTPException(401, str(error))
    if "echo" not in claims.get("scope", "").split():
        raise HTTPException(403, "insufficient scope")
    readable = READABLE.get(claims.get("org"), set())
    hits = [hit for hit in retriever.retrieve(body.query) if hit.node.metadata.get("collection") in readable][: body.k]
    return {"hits": [{"document_id": hit.node.metadata["file"], "chunk_id": hit.node.node_id, "score": hit.score, "text": hit.node.get_content()} for hit in hits]}


print(json.dumps({"nodes": len(nodes)}), flush=True)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
