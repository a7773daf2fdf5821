// s3rver with its own traffic counters: the benchmark's `--direct` mode, where loaders talk to
// the server with no proxy hop (the counting proxy costs a core's worth of CPU on 2 cores).
//
// Usage: node s3rver_counting.js DIRECTORY PORT BUCKET STATS_PORT
// Prints "READY" once both servers listen on 127.0.0.1. GET http://127.0.0.1:STATS_PORT/stats
// returns the counters as JSON (the same keys as s3proxy.py's), /reset returns and zeroes them.
// Counted: requests (by method, ranged GETs, statuses), response body bytes (every write of a
// response after its headers), connections, most requests in flight at once.
'use strict';

const http = require('http');
const S3rver = require('s3rver');

const [directory, port, bucket, statsPort] = process.argv.slice(2);

function fresh() {
  return {
    requests: 0,
    by_method: {},
    ranged_gets: 0,
    body_bytes: 0,
    header_bytes: null, // not counted here (the proxy counts them)
    request_bytes: null,
    connections: 0,
    max_in_flight: 0,
    statuses: {},
    upstream_reconnects: null, // no upstream
    client_aborts: 0,
  };
}

let counters = fresh();
let active = 0;

const server = new S3rver({
  directory,
  address: '127.0.0.1',
  port: Number(port),
  silent: true,
  configureBuckets: [{ name: bucket }],
});

// Outermost middleware: Koa composes `middleware` when the server starts listening.
server.middleware.unshift(async (ctx, next) => {
  const c = counters;
  c.requests += 1;
  c.by_method[ctx.method] = (c.by_method[ctx.method] || 0) + 1;
  if (ctx.method === 'GET' && ctx.get('range')) c.ranged_gets += 1;
  active += 1;
  c.max_in_flight = Math.max(c.max_in_flight, active);
  const res = ctx.res;
  const write = res.write;
  const end = res.end;
  const count = chunk => {
    if (chunk && typeof chunk !== 'function') counters.body_bytes += Buffer.byteLength(chunk);
  };
  res.write = function (chunk, ...rest) {
    count(chunk);
    return write.call(this, chunk, ...rest);
  };
  res.end = function (chunk, ...rest) {
    count(chunk);
    return end.call(this, chunk, ...rest);
  };
  let done = false;
  const finish = aborted => {
    if (done) return;
    done = true;
    active -= 1;
    const status = String(res.statusCode);
    counters.statuses[status] = (counters.statuses[status] || 0) + 1;
    if (aborted) counters.client_aborts += 1;
  };
  res.on('finish', () => finish(false));
  res.on('close', () => finish(!res.writableFinished));
  await next();
});

const stats = http.createServer((req, res) => {
  const body = JSON.stringify(counters);
  if (req.url.startsWith('/reset')) counters = fresh();
  res.writeHead(200, { 'Content-Type': 'application/json' });
  res.end(body);
});

server.run((err, address) => {
  if (err) {
    console.error(err);
    process.exit(1);
  }
  server.httpServer.on('connection', () => {
    counters.connections += 1;
  });
  stats.listen(Number(statsPort), '127.0.0.1', () => {
    process.stdout.write('READY\n');
  });
});
