"""B2 baseline: LangChain's RecursiveCharacterTextSplitter over the same texts Echo's
chunker splits, with the same size and overlap in characters.

usage: langchain_chunk.py SIZE OVERLAP FILE_LIST
FILE_LIST holds one path per line.
Prints one JSON line: per file its seconds and chunk count.
"""
import json
import sys
import time

from langchain_text_splitters import RecursiveCharacterTextSplitter

size, overlap = int(sys.argv[1]), int(sys.argv[2])
splitter = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap)
results = []
for path in [line.strip() for line in open(sys.argv[3], encoding="utf-8") if line.strip()]:
    text = open(path, encoding="utf-8").read()
    started = time.perf_counter()
    chunks = splitter.split_text(text)
    results.append({"file": path, "seconds": time.perf_counter() - started, "chunks": len(chunks), "bytes": len(text.encode())})
print(json.dumps({"results": results}))
