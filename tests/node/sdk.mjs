// The official Node SDK (npm `openai`) against a running Bastion, one call of tests/test_node_sdk.py
// per run: `node sdk.mjs COMMAND '{"json": "arguments"}'`, with OPENAI_BASE_URL and OPENAI_API_KEY
// set. Prints one JSON object for the test to check.
import fs from 'node:fs'
import OpenAI from 'openai'

const client = new OpenAI({ maxRetries: 0, timeout: 120_000 })
const [command, raw] = process.argv.slice(2)
const args = raw ? JSON.parse(raw) : {}

const commands = {
  async chat({ model, messages, max_tokens, seed }) {
    const r = await client.chat.completions.create({ model, messages, max_tokens, seed, temperature: 0 })
    return r
  },

  async stream({ model, messages, max_tokens, seed }) {
    const stream = await client.chat.completions.create({
      model, messages, max_tokens, seed, temperature: 0, stream: true,
      stream_options: { include_usage: true },
    })
    let text = ''
    let finish_reason = null
    let usage = null
    let chunks = 0
    for await (const chunk of stream) {
      chunks += 1
      if (chunk.usage) usage = chunk.usage
      const choice = chunk.choices[0]
      if (choice) {
        text += choice.delta.content ?? ''
        finish_reason = choice.finish_reason ?? finish_reason
      }
    }
    return { text, finish_reason, usage, chunks }
  },

  // No encoding_format: the SDK asks for base64 and decodes it into float32 itself.
  async embeddings({ model, input }) {
    const r = await client.embeddings.create({ model, input })
    return { model: r.model, usage: r.usage, vectors: r.data.map(d => d.embedding) }
  },

  async files({ path }) {
    const created = await client.files.create({ file: fs.createReadStream(path), purpose: 'fine-tune' })
    const listed = []
    for await (const f of client.files.list({ purpose: 'fine-tune' })) listed.push(f.id)
    const retrieved = await client.files.retrieve(created.id)
    const content = await (await client.files.content(created.id)).text()
    const deleted = await client.files.delete(created.id)
    let after = null
    try {
      await client.files.retrieve(created.id)
    } catch (e) {
      after = { status: e.status, type: e.error?.type, name: e.constructor.name }
    }
    return { created, listed, retrieved, content, deleted, after }
  },

  async fine_tuning({ model, path }) {
    const file = await client.files.create({ file: fs.createReadStream(path), purpose: 'fine-tune' })
    const created = await client.fineTuning.jobs.create({
      model, training_file: file.id, hyperparameters: { n_epochs: 1 },
    })
    const listed = []
    for await (const j of client.fineTuning.jobs.list({ limit: 10 })) listed.push(j.id)
    const retrieved = await client.fineTuning.jobs.retrieve(created.id)
    const events = (await client.fineTuning.jobs.listEvents(created.id)).data
    const cancelled = await client.fineTuning.jobs.cancel(created.id)
    const after = await client.fineTuning.jobs.retrieve(created.id)
    return { created, listed, retrieved, events, cancelled, after }
  },

  async models({ id }) {
    const listed = []
    for await (const m of client.models.list()) listed.push(m)
    const retrieved = await client.models.retrieve(id)
    let missing = null
    try {
      await client.models.retrieve('no-such-model')
    } catch (e) {
      missing = { status: e.status, type: e.error?.type, name: e.constructor.name }
    }
    return { listed, retrieved, missing }
  },
}

console.log(JSON.stringify(await commands[command](args)))
