// A Node.js caller of transformers-sidecar: the sidecar.v1 contract loaded at run time from
// the .proto files (no generated code), with promise and async-iterator helpers.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const googleProtos = require('google-proto-files');

// proto/ of this repository; point SIDECAR_PROTO_DIR elsewhere when the client is copied out.
const PROTO_DIR = process.env.SIDECAR_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');
const DEFAULT_ADDRESS = '127.0.0.1:50051';

// keepCase: the fields keep their .proto names (token_count, finish_reason), as in every other
// language's docs; enums arrive as their names; 64-bit integers as Numbers (they are
// microseconds and token counts, far below 2^53); oneofs name the field that is set.
const LOADER_OPTIONS = {
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: true,
  oneofs: true,
};

/** The sidecar.v1 package: message types and service constructors. */
function loadContract(protoDir = PROTO_DIR) {
  const definition = protoLoader.loadSync(
    ['sidecar/v1/inference.proto', 'sidecar/v1/models.proto'],
    {
      ...LOADER_OPTIONS,
      // google/rpc/status.proto (Stream's per-item errors) comes from google-proto-files.
      includeDirs: [protoDir, path.dirname(path.dirname(googleProtos.getProtoPath('rpc')))],
    },
  );
  return grpc.loadPackageDefinition(definition).sidecar.v1;
}

/**
 * Clients for sidecar.v1.Inference and sidecar.v1.Models on one channel.
 * `address` is host:port or unix:/path/to/sidecar.sock; the default is
 * $TRANSFORMERS_SIDECAR_ADDRESS (set by the Helm chart), else 127.0.0.1:50051.
 */
function connect(address = process.env.TRANSFORMERS_SIDECAR_ADDRESS || DEFAULT_ADDRESS, options = {}) {
  const contract = loadContract(options.protoDir);
  const credentials = options.credentials || grpc.credentials.createInsecure();
  const inference = new contract.Inference(address, credentials, options.channelOptions);
  // The Models client shares the Inference client's channel.
  const models = new contract.Models(address, credentials, {
    channelOverride: inference.getChannel(),
  });
  return {
    inference,
    models,
    close() {
      inference.close();
    },
  };
}

/** CallOptions with a deadline `timeoutMs` from now (none when not given). */
function withDeadline(timeoutMs) {
  return timeoutMs === undefined ? {} : { deadline: new Date(Date.now() + timeoutMs) };
}

/**
 * A unary call as a promise: `await call(inference, 'Embed', {inputs: [...]}, {timeoutMs: 2000})`.
 * Rejects with the gRPC error (err.code is a grpc.status number, err.details the server's message).
 */
function call(client, method, request, { timeoutMs, metadata } = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata || new grpc.Metadata(), withDeadline(timeoutMs), (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

/**
 * Generate as an async iterator of GenerateResponse: one message per token delta; the last
 * carries finish_reason, usage and metadata. Breaking out of the loop cancels the call, which
 * stops decoding on the server within one step.
 */
async function* generate(inference, request, { timeoutMs, metadata } = {}) {
  const stream = inference.Generate(request, metadata || new grpc.Metadata(), withDeadline(timeoutMs));
  try {
    for await (const message of stream) {
      yield message;
    }
  } finally {
    stream.cancel();
  }
}

/**
 * Runs many requests over one Stream and collects every answer by id. `items` are
 * StreamRequest objects ({id, embed: {...}} and the like). Resolves with a Map id -> answer;
 * an item the server refused has `error` (a google.rpc.Status: code, message) instead of a
 * result, while the others succeed.
 */
function streamAll(inference, items, { timeoutMs, metadata } = {}) {
  return new Promise((resolve, reject) => {
    const answers = new Map();
    const stream = inference.Stream(metadata || new grpc.Metadata(), withDeadline(timeoutMs));
    stream.on('data', (answer) => {
      // generate items answer with many messages: keep them all, in order.
      const previous = answers.get(answer.id);
      if (answer.response === 'generate') {
        answers.set(answer.id, [...(previous || []), answer]);
      } else {
        answers.set(answer.id, answer);
      }
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(answers));
    for (const item of items) {
      stream.write(item);
    }
    stream.end();
  });
}

module.exports = { connect, loadContract, call, generate, streamAll, status: grpc.status, Metadata: grpc.Metadata };
