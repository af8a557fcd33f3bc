// ollama-js against the gate: list, streamed chat, embed. Prints one JSON object.
// Usage: node tests/js/sdk_check.mjs <gate url>   (driven by tests/test_sdk_js.py)
import { Ollama } from 'ollama'

const host = process.argv[2]
if (!host) {
  console.error('usage: node sdk_check.mjs <gate url>')
  process.exit(2)
}

const ollama = new Ollama({ host })
const out = {}

const listed = await ollama.list()
out.list = listed.models.map((m) => m.model)

const stream = await ollama.chat({
  model: 'llama3.2',
  messages: [{ role: 'user', content: 'hello from js' }],
  stream: true,
})
out.chat = []
for await (const part of stream) {
  out.chat.push({ content: part.message.content, done: part.done })
}

const embedded = await ollama.embed({ model: 'nomic-embed-text', input: ['alpha', 'beta'] })
out.embed = embedded.embeddings

// A stream the upstream cuts short must end in an error the SDK raises, not a parse failure.
out.broken = { parts: [] }
try {
  const dying = new Ollama({ host, headers: { 'X-Fake-Die-After': '2' } })
  const broken = await dying.chat({
    model: 'llama3.2',
    messages: [{ role: 'user', content: 'die' }],
    stream: true,
  })
  for await (const part of broken) {
    out.broken.parts.push(part.message.content)
  }
} catch (err) {
  out.broken.error = String(err.message ?? err)
}

console.log(JSON.stringify(out))
