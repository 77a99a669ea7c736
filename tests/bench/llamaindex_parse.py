"""B1 baseline: LlamaIndex's SimpleDirectoryReader (pypdf for PDF) reading the same files
Echo's parser reads, timed in-process; writes each PDF's text per page for the
completeness check.

usage: llamaindex_parse.py FILE_LIST OUT_JSON
FILE_LIST holds one path per line. Prints one JSON line: seconds, documents, characters.
"""
import json
import sys
import time

from llama_index.core import SimpleDirectoryReader

files = [line.strip() for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
started = time.perf_counter()
documents = SimpleDirectoryReader(input_files=files).load_data(show_progress=False)
seconds = time.perf_counter() - started

pdf_text = {}
for document in documents:
    path = document.metadata.get("file_path", "")
    if path.lower().endswith(".pdf"):
        pdf_text.setdefault(path, []).append(document.text)
with open(sys.argv[2], "w", encoding="utf-8") as out:
    json.dump({path: "\n".join(pages) for path, pages in pdf_text.items()}, out)
print(json.dumps({"seconds": seconds, "documents": len(documents), "characters": sum(len(d.text) for d in documents)}))
