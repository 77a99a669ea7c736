"""Echo as an OpenAI-compatible model, driven by the ecosystem's own clients: the
official `openai` Python library (models, a completion, a stream with usage, history in
`messages` for a follow-up) and LangChain's `ChatOpenAI` (invoke and stream).

usage: openai_clients.py BASE_URL ACCESS_TOKEN QUESTION FACT FOLLOW_UP FOLLOW_UP_FACT
Prints one `ok: …` line per check; exits non-zero on the first failure.
"""
import sys

from langchain_openai import ChatOpenAI
from openai import OpenAI

base_url, token, question, fact, follow_up, follow_up_fact = sys.argv[1:7]


def check(condition, what, detail=""):
    if not condition:
        print(f"FAILED: {what}: {detail}")
        sys.exit(1)
    print(f"ok: {what}")


client = OpenAI(base_url=base_url, api_key=token, max_retries=0)
models = [m.id for m in client.models.list()]
check("echo" in models, "models.list names echo", models)

completion = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": question}])
answer = completion.choices[0].message.content
check(fact in answer, "a completion holds the fact", answer)
check(completion.usage is not None, "a completion reports usage", completion)
citations = (completion.model_extra or {}).get("citations") or []
check(len(citations) > 0 and all("chunk_id" in c for c in citations), "a completion carries its citations", citations)

pieces, usage, streamed_citations, objects = [], None, [], set()
stream = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": question}], stream=True, stream_options={"include_usage": True})
for chunk in stream:
    objects.add(chunk.object)
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
    streamed_citations.extend((chunk.model_extra or {}).get("citations") or [])
check(objects == {"chat.completion.chunk"}, "every streamed chunk is a chat.completion.chunk", objects)
check(fact in "".join(pieces), "the stream holds the fact", "".join(pieces))
check(usage is not None, "include_usage adds the usage chunk")
check(len(streamed_citations) > 0, "the stream carries the citations")

history = [
    {"role": "user", "content": question},
    {"role": "assistant", "content": answer},
    {"role": "user", "content": follow_up},
]
followed = client.chat.completions.create(model="echo", messages=history).choices[0].message.content
check(follow_up_fact in followed, "a follow-up uses the history in messages", followed)

chat = ChatOpenAI(model="echo", base_url=base_url, api_key=token, max_retries=0)
reply = chat.invoke(question)
check(fact in reply.content, "LangChain ChatOpenAI.invoke", reply.content)
streamed = "".join(part.content for part in chat.stream(question))
check(fact in streamed, "LangChain ChatOpenAI.stream", streamed)
