// The Node client against a live sidecar: TRANSFORMERS_SIDECAR_ADDRESS serves three models
// (minilm: embed, triage: classify, gpt2: generate), and SIDECAR_EXPECTED names a JSON file
// of the answers the Python client got from the same server, so both languages must agree.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const { after, before, test } = require('node:test');
const { call, connect, generate, status, streamAll } = require('..');

const expected = JSON.parse(fs.readFileSync(process.env.SIDECAR_EXPECTED, 'utf8'));
let sidecar;

before(() => {
  sidecar = connect();
});
after(() => sidecar.close());

function assertClose(actual, wanted, tolerance = 1e-6) {
  assert.equal(actual.length, wanted.length);
  actual.forEach((value, i) => assert.ok(Math.abs(value - wanted[i]) <= tolerance, `[${i}] ${value} != ${wanted[i]}`));
}

async function refused(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the call succeeded');
}

test('Embed', async () => {
  const reply = await call(sidecar.inference, 'Embed', { model: 'minilm', inputs: expected.texts }, { timeoutMs: 10000 });
  assert.equal(reply.dimensions, 384);
  assert.equal(reply.embeddings.length, expected.texts.length);
  reply.embeddings.forEach((embedding, i) => assertClose(embedding.values, expected.embeddings[i]));
  assert.equal(reply.metadata.model, 'minilm');
  assert.equal(reply.metadata.backend, 'onnx');
});

test('Classify', async () => {
  const reply = await call(sidecar.inference, 'Classify', { model: 'triage', inputs: expected.texts }, { timeoutMs: 10000 });
  reply.results.forEach((result, i) => {
    const scores = result.labels.map((s) => [s.label, s.score]);
    assert.deepEqual(scores.map(([label]) => label), expected.classify[i].map(([label]) => label));
    assertClose(scores.map(([, score]) => score), expected.classify[i].map(([, score]) => score));
  });
});

test('Tokenize', async () => {
  const reply = await call(sidecar.inference, 'Tokenize', { model: 'minilm', inputs: ['Café 東京'] });
  const [tokens] = reply.results;
  assert.deepEqual(tokens.ids, expected.tokenize.ids);
  assert.deepEqual(tokens.tokens, expected.tokenize.tokens);
  // Offsets count code points, so they index JavaScript strings of BMP text directly.
  assert.deepEqual(tokens.offsets.map((s) => [s.start, s.end]), expected.tokenize.offsets);
});

test('Generate streams one message per token, metadata on the last', async () => {
  const messages = [];
  for await (const message of generate(sidecar.inference, { model: 'gpt2', prompt: expected.prompt, max_new_tokens: 12 }, { timeoutMs: 30000 })) {
    messages.push(message);
  }
  const last = messages.at(-1);
  assert.equal(messages.map((m) => m.text).join(''), expected.generated);
  assert.equal(last.usage.completion_tokens, expected.completion_tokens);
  assert.equal(messages.length, expected.completion_tokens);
  assert.equal(last.finish_reason, expected.finish_reason);
  assert.equal(last.metadata.model, 'gpt2');
  for (const message of messages.slice(0, -1)) {
    assert.equal(message.finish_reason, 'FINISH_REASON_UNSPECIFIED');
    assert.equal(message.usage, null);
  }
});

test('Generate with a JSON schema replies with JSON that holds to it', async () => {
  let reply = '';
  let last;
  const request = {
    model: 'gpt2', prompt: expected.texts[0], max_new_tokens: 64, response_format: { json_schema: expected.schema },
  };
  for await (const message of generate(sidecar.inference, request, { timeoutMs: 30000 })) {
    reply += message.text;
    last = message;
  }
  assert.equal(reply, expected.triaged);
  assert.equal(last.finish_reason, 'FINISH_REASON_COMPLETE');
  const triage = JSON.parse(reply); // a random model, so any category: but always valid
  assert.ok(['billing', 'login', 'bug'].includes(triage.category));
  assert.equal(typeof triage.urgent, 'boolean');
  assert.deepEqual(Object.keys(triage).sort(), ['category', 'urgent']);
});

test('Stream: many ids, one bad item answered with its own error, the rest succeed', async () => {
  const items = expected.texts.map((text, i) => ({ id: `embed-${i}`, embed: { model: 'minilm', inputs: [text] } }));
  items.push({ id: 'bad', embed: { model: 'minilm', inputs: [' '] } });
  items.push({ id: 'triage', classify: { model: 'triage', inputs: [expected.texts[0]] } });
  items.push({ id: 'tokens', tokenize: { model: 'minilm', inputs: ['Café 東京'] } });
  items.push({ id: 'story', generate: { model: 'gpt2', prompt: expected.prompt, max_new_tokens: 12 } });
  const answers = await streamAll(sidecar.inference, items, { timeoutMs: 30000 });
  assert.deepEqual([...answers.keys()].sort(), items.map((item) => item.id).sort());
  expected.texts.forEach((_, i) => {
    const answer = answers.get(`embed-${i}`);
    assert.equal(answer.response, 'embed');
    assertClose(answer.embed.embeddings[0].values, expected.embeddings[i]);
  });
  const bad = answers.get('bad');
  assert.equal(bad.response, 'error');
  assert.equal(bad.error.code, status.INVALID_ARGUMENT);
  assert.match(bad.error.message, /inputs\[0\] is empty or whitespace-only/);
  assert.equal(answers.get('triage').classify.results[0].labels[0].label, expected.classify[0][0][0]);
  assert.deepEqual(answers.get('tokens').tokenize.results[0].ids, expected.tokenize.ids);
  const story = answers.get('story');
  assert.equal(story.map((m) => m.generate.text).join(''), expected.generated);
  assert.equal(story.at(-1).generate.finish_reason, expected.finish_reason);
});

test('error codes and messages', async () => {
  const empty = await refused(call(sidecar.inference, 'Embed', { model: 'minilm', inputs: [''] }));
  assert.equal(empty.code, status.INVALID_ARGUMENT);
  assert.match(empty.details, /inputs\[0\] is empty/);
  const unknown = await refused(call(sidecar.inference, 'Embed', { model: 'nope', inputs: ['x'] }));
  assert.equal(unknown.code, status.NOT_FOUND);
  assert.match(unknown.details, /minilm/); // the served models are listed
  const wrongTask = await refused(call(sidecar.inference, 'Classify', { model: 'minilm', inputs: ['x'] }));
  assert.equal(wrongTask.code, status.FAILED_PRECONDITION);
  const badParameter = await refused(
    (async () => {
      for await (const _ of generate(sidecar.inference, { model: 'gpt2', prompt: 'x', top_p: 2 })) {
        // never reached: refused before the first token
      }
    })(),
  );
  assert.equal(badParameter.code, status.INVALID_ARGUMENT);
  assert.match(badParameter.details, /top_p/);
});

test('a deadline', async () => {
  const late = await refused(call(sidecar.inference, 'Embed', { model: 'minilm', inputs: expected.texts }, { timeoutMs: 1 }));
  assert.equal(late.code, status.DEADLINE_EXCEEDED);
  // The server goes on serving.
  const reply = await call(sidecar.inference, 'Embed', { model: 'minilm', inputs: ['after'] }, { timeoutMs: 10000 });
  assert.equal(reply.embeddings.length, 1);
});

test('Models', async () => {
  const listed = await call(sidecar.models, 'ListModels', {});
  assert.deepEqual(listed.models.map((m) => [m.name, m.task, m.state]), [
    ['minilm', 'TASK_EMBED', 'MODEL_STATE_SERVING'],
    ['triage', 'TASK_CLASSIFY', 'MODEL_STATE_SERVING'],
    ['gpt2', 'TASK_GENERATE', 'MODEL_STATE_SERVING'],
  ]);
  assert.equal(listed.default_model, 'minilm');
});
