#!/usr/bin/env node
// A gradtap client written from docs/protocol.md and the proto alone: it shares no code
// with gradtap's Python packages. It calls Analyze, reassembles every tensor of the stream
// and writes them out; the test suite compares them with the Python client's result.
//
// Usage:
//   node tests/node/analyze.js ADDRESS MODEL INPUT_FILE INPUT_SHAPE TARGETS OBJECTIVE OUTPUT
//
//   ADDRESS      host:port of a gradtap server
//   MODEL        the model's name, e.g. seed-convnet
//   INPUT_FILE   the model's single input: raw little-endian float32 bytes, row-major
//   INPUT_SHAPE  e.g. 1,3,28,28
//   TARGETS      graph-node names or module paths, comma-separated, e.g. relu_1
//   OBJECTIVE    sum | logit:<k> | cross_entropy:<label>[,<label>...] (one label per row)
//   OUTPUT       path of the JSON description; tensor bytes go to OUTPUT.<id>.bin
//
// Environment: GRADTAP_TOKEN (bearer token, optional), GRADTAP_TIMEOUT (seconds, default 60).
//
// Exit status: 0 on success, 1 when the call failed or the stream was incomplete (the gRPC
// status code and message are printed to stderr), 2 on bad arguments.
'use strict';

const fs = require('fs');
const path = require('path');

// The packages live in tools/node_modules, installed by `make install`.
const NODE_MODULES = path.resolve(__dirname, '..', '..', 'tools', 'node_modules');
const grpc = require(path.join(NODE_MODULES, '@grpc', 'grpc-js'));
const protoLoader = require(path.join(NODE_MODULES, '@grpc', 'proto-loader'));

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = path.join(PROTO_ROOT, 'gradtap', 'v1', 'gradtap.proto');

const MAX_RECEIVE_BYTES = 16 * 1024 * 1024;
const MAX_SEND_BYTES = 64 * 1024 * 1024;

// Byte width of each wire dtype (docs/protocol.md, "Data types").
const DTYPE_WIDTH = {
  DTYPE_FLOAT32: 4,
  DTYPE_FLOAT64: 8,
  DTYPE_FLOAT16: 2,
  DTYPE_BFLOAT16: 2,
  DTYPE_INT64: 8,
  DTYPE_INT32: 4,
  DTYPE_INT16: 2,
  DTYPE_INT8: 1,
  DTYPE_UINT8: 1,
  DTYPE_BOOL: 1,
};

class UsageError extends Error {}

// A failed call: a gRPC status code (number and name) and a message.
class CallError extends Error {
  constructor(code, message, details) {
    super(message);
    this.code = code;
    this.details = details || [];
  }
}

function dataLoss(message) {
  return new CallError(grpc.status.DATA_LOSS, message);
}

function parseShape(text) {
  const shape = text.split(',').map((s) => s.trim()).filter((s) => s !== '').map(Number);
  if (shape.some((d) => !Number.isInteger(d) || d < 0)) {
    throw new UsageError(`bad shape ${JSON.stringify(text)}: expected e.g. 1,3,28,28`);
  }
  return shape;
}

function product(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function int64Tensor(values) {
  const data = Buffer.alloc(8 * values.length);
  values.forEach((v, i) => data.writeBigInt64LE(BigInt(v), 8 * i));
  return { dtype: 'DTYPE_INT64', shape: [String(values.length)], data };
}

function parseObjective(text) {
  const site = { output: 0, node: '' };
  const [kind, arg] = text.split(/:(.*)/s);
  const ints = () => {
    const values = (arg || '').split(',').map((s) => s.trim());
    if (values.length === 0 || values.some((s) => !/^-?\d+$/.test(s))) {
      throw new UsageError(`objective ${JSON.stringify(text)} needs integers after the colon`);
    }
    return values;
  };
  if (kind === 'sum' && arg === undefined) return { sum: { site } };
  if (kind === 'logit') return { logit: { site, index: ints() } };
  if (kind === 'cross_entropy') {
    return {
      cross_entropy: { site, labels: int64Tensor(ints()), reduction: 'LOSS_REDUCTION_MEAN' },
    };
  }
  throw new UsageError(
    `unknown objective ${JSON.stringify(text)}: use sum, logit:<k> or cross_entropy:<label>`,
  );
}

function buildRequest(args) {
  const shape = parseShape(args.shape);
  let data;
  try {
    data = fs.readFileSync(args.input);
  } catch (e) {
    throw new UsageError(`cannot read ${args.input}: ${e.message}`);
  }
  if (data.length !== product(shape) * 4) {
    throw new UsageError(
      `${args.input} has ${data.length} bytes; shape [${shape}] of float32 needs ` +
        `${product(shape) * 4}`,
    );
  }
  const targets = args.targets.split(',').filter((t) => t !== '');
  return {
    model: { name: args.model, digest: '' },
    inputs: [{ dtype: 'DTYPE_FLOAT32', shape: shape.map(String), data }],
    targets: targets.map((name) => ({ name, capture: 'CAPTURE_GRADIENT' })),
    objective: parseObjective(args.objective),
    input_grads: true,
    outputs: true,
  };
}

// Reassembles one Analyze stream (docs/protocol.md, "Reassembling a result").
class Assembler {
  constructor() {
    this.headers = null;
    this.buffers = [];
    this.filled = [];
    this.summary = null;
    this.messages = 0;
    this.chunks = 0;
  }

  feed(message) {
    this.messages += 1;
    if (this.summary !== null) throw dataLoss('the stream went on after its summary');
    if (message.header) {
      if (this.headers !== null) throw dataLoss('the stream sent a second header');
      this.allocate(message.header.tensors);
    } else if (this.headers === null) {
      throw dataLoss('the stream did not start with a header');
    }
    for (const chunk of message.chunks) this.copy(chunk);
    if (message.summary) this.finish(message.summary);
  }

  allocate(headers) {
    headers.forEach((h, i) => {
      const width = DTYPE_WIDTH[h.dtype];
      const shape = h.shape.map(Number);
      if (Number(h.id) !== i || width === undefined || shape.some((d) => d < 0)) {
        throw dataLoss(`tensor header ${i} is malformed`);
      }
      const byteSize = Number(h.byte_size);
      if (product(shape) * width !== byteSize) {
        throw dataLoss(`tensor header ${i}: byte_size does not match shape and dtype`);
      }
      this.buffers.push(Buffer.alloc(byteSize));
      this.filled.push(0);
    });
    this.headers = headers;
  }

  copy(chunk) {
    const id = Number(chunk.tensor_id);
    if (id >= this.buffers.length) throw dataLoss(`a chunk names unknown tensor ${id}`);
    const target = this.buffers[id];
    const offset = Number(chunk.offset);
    const data = chunk.data;
    if (offset !== this.filled[id] || offset + data.length > target.length) {
      throw dataLoss(`tensor ${id}: chunk at offset ${offset} is out of order`);
    }
    target.set(data, offset);
    this.filled[id] = offset + data.length;
    this.chunks += 1;
  }

  finish(summary) {
    if (this.headers === null || Number(summary.tensor_count) !== this.headers.length) {
      throw dataLoss("the summary's tensor count does not match the header");
    }
    this.filled.forEach((filled, i) => {
      if (filled !== this.buffers[i].length) {
        throw dataLoss(`tensor ${i} is incomplete: ${filled} of ${this.buffers[i].length} bytes`);
      }
    });
    this.summary = summary;
  }

  // Called when the server ended the stream with status OK.
  end() {
    if (this.summary === null) {
      throw dataLoss('the stream ended before its summary; the result is incomplete');
    }
  }
}

// --- google.rpc.Status from the grpc-status-details-bin trailer --------------------------
// Decoded by hand from the protobuf wire format, so that only gradtap.proto is loaded.

function readVarint(buf, pos) {
  let value = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const byte = buf[pos++];
    value |= BigInt(byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return [value, pos];
    shift += 7n;
  }
}

// Field number -> list of raw values (BigInt for varints, Buffer for length-delimited).
function fields(buf) {
  const out = new Map();
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const number = Number(key >> 3n);
    const wire = Number(key & 7n);
    let value;
    if (wire === 0) {
      [value, pos] = readVarint(buf, pos);
    } else if (wire === 2) {
      let length;
      [length, pos] = readVarint(buf, pos);
      value = buf.subarray(pos, pos + Number(length));
      pos += Number(length);
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4;
      continue;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
    if (!out.has(number)) out.set(number, []);
    out.get(number).push(value);
  }
  return out;
}

function text(map, number) {
  const values = map.get(number);
  return values ? values[values.length - 1].toString('utf8') : '';
}

// Human-readable lines for ErrorInfo and BadRequest details; never throws.
function statusDetails(metadata) {
  const lines = [];
  try {
    for (const raw of metadata.get('grpc-status-details-bin')) {
      const status = fields(Buffer.from(raw));
      for (const any of status.get(3) || []) {
        const detail = fields(any);
        const type = text(detail, 1);
        const value = (detail.get(2) || [Buffer.alloc(0)])[0];
        if (type.endsWith('/google.rpc.ErrorInfo')) {
          const info = fields(value);
          lines.push(`reason: ${text(info, 1)} (domain ${text(info, 2)})`);
        } else if (type.endsWith('/google.rpc.BadRequest')) {
          for (const violation of fields(value).get(1) || []) {
            const v = fields(violation);
            lines.push(`field: ${text(v, 1)}: ${text(v, 2)}`);
          }
        } else {
          lines.push(`detail: ${type}`);
        }
      }
    }
  } catch (e) {
    lines.push(`(could not decode grpc-status-details-bin: ${e.message})`);
  }
  return lines;
}

// --- the call ------------------------------------------------------------------------------

function analyze(address, request) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_ROOT],
  });
  const proto = grpc.loadPackageDefinition(definition);
  const client = new proto.gradtap.v1.GradientService(
    address,
    grpc.credentials.createInsecure(),
    {
      'grpc.max_receive_message_length': MAX_RECEIVE_BYTES,
      'grpc.max_send_message_length': MAX_SEND_BYTES,
    },
  );
  const metadata = new grpc.Metadata();
  if (process.env.GRADTAP_TOKEN) {
    metadata.set('authorization', `Bearer ${process.env.GRADTAP_TOKEN}`);
  }
  const seconds = Number(process.env.GRADTAP_TIMEOUT || 60);
  const assembler = new Assembler();

  return new Promise((resolve, reject) => {
    let failed = false;
    const fail = (error) => {
      if (failed) return;
      failed = true;
      call.cancel();
      client.close();
      reject(error);
    };
    const call = client.Analyze(request, metadata, {
      deadline: new Date(Date.now() + seconds * 1000),
    });
    call.on('data', (message) => {
      try {
        assembler.feed(message);
      } catch (e) {
        fail(e);
      }
    });
    call.on('error', (e) => {
      fail(new CallError(e.code, e.details || e.message, statusDetails(e.metadata)));
    });
    call.on('end', () => {
      if (failed) return;
      try {
        assembler.end();
      } catch (e) {
        fail(e);
        return;
      }
      failed = true;
      client.close();
      resolve(assembler);
    });
  });
}

function write(assembler, output) {
  const tensors = assembler.headers.map((h, i) => {
    const file = `${path.basename(output)}.${i}.bin`;
    fs.writeFileSync(path.join(path.dirname(output), file), assembler.buffers[i]);
    return {
      id: i,
      role: h.role,
      name: h.name,
      index: Number(h.index),
      dtype: h.dtype,
      shape: h.shape.map(Number),
      byte_size: Number(h.byte_size),
      file,
    };
  });
  const s = assembler.summary;
  const description = {
    tensors,
    summary: {
      loss: s.loss,
      model_digest: s.model_digest,
      device: s.device,
      torch_version: s.torch_version,
      replica: s.replica,
      tensor_count: Number(s.tensor_count),
    },
    stream: { messages: assembler.messages, chunks: assembler.chunks },
  };
  fs.writeFileSync(output, JSON.stringify(description, null, 2) + '\n');
}

function codeName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || 'UNKNOWN';
}

async function main(argv) {
  if (argv.length !== 7) {
    throw new UsageError(
      'usage: analyze.js ADDRESS MODEL INPUT_FILE INPUT_SHAPE TARGETS OBJECTIVE OUTPUT',
    );
  }
  const [address, model, input, shape, targets, objective, output] = argv;
  const request = buildRequest({ model, input, shape, targets, objective });
  const assembler = await analyze(address, request);
  write(assembler, output);
}

main(process.argv.slice(2)).then(
  () => process.exit(0),
  (e) => {
    if (e instanceof UsageError) {
      console.error(e.message);
      process.exit(2);
    }
    if (e instanceof CallError) {
      console.error(`Analyze failed: ${codeName(e.code)} (code ${e.code}): ${e.message}`);
      for (const line of e.details) console.error(`  ${line}`);
      process.exit(1);
    }
    console.error(`Analyze failed: ${e.stack || e}`);
    process.exit(1);
  },
);
