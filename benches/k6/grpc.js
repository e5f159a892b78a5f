// A ghz-like gRPC scenario for k6 (https://k6.io), an independent client:
// a constant arrival rate against one keyward method, discovered through
// server reflection, with pass/fail thresholds (SMOKE=1: correctness only).
//
//   TARGET=127.0.0.1:50051 METHOD=keyward.v1.Authorizer/Authorize \
//   REQUEST='{"key":"SG....","method":"POST","path":"/v3/mail/send"}' \
//   RATE=1000 DURATION=10s k6 run benches/k6/grpc.js
//
// `cargo bench --bench load -- external` runs it for Health, Echo and
// Authorize next to h2load and reads the summary it exports.
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const target = __ENV.TARGET || '127.0.0.1:50051';
const rate = Number(__ENV.RATE || 1000);
const seconds = parseInt(__ENV.DURATION || '10s', 10);
const method = __ENV.METHOD || 'grpc.health.v1.Health/Check';
const request = JSON.parse(__ENV.REQUEST || '{}');
// For Authorize: every reply must allow the request, not just be OK.
const expectAllowed = method.endsWith('/Authorize');

// SMOKE=1 (CI): a fixed number of calls with no rate and no latency
// threshold, so a loaded machine cannot fail it: only correctness counts.
const smoke = __ENV.SMOKE === '1';

export const options = smoke
  ? {
      scenarios: {
        calls: { executor: 'shared-iterations', vus: 4, iterations: Number(__ENV.ITERATIONS || 400), maxDuration: '5m' },
      },
      thresholds: { checks: ['rate==1'] },
      summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
    }
  : {
      scenarios: {
        fixed_rate: {
          executor: 'constant-arrival-rate',
          rate,
          timeUnit: '1s',
          duration: `${seconds}s`,
          preAllocatedVUs: Number(__ENV.VUS || 50),
          maxVUs: 200,
        },
      },
      thresholds: {
        // ghz-style pass/fail for benchmark runs: every call OK (and
        // allowed), tail latency bounded, and the rate actually reached (at
        // most 0.1% of iterations dropped, the ones due while each VU makes
        // its connection and reflection lookup).
        checks: ['rate==1'],
        grpc_req_duration: [`p(99)<${__ENV.P99_MS || 50}`],
        dropped_iterations: [`count<=${Math.ceil((rate * seconds) / 1000)}`],
      },
      summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
    };

const client = new grpc.Client();
let connected = false;

export default function () {
  if (!connected) {
    client.connect(target, { plaintext: true, reflect: true });
    connected = true;
  }
  const response = client.invoke(method, request);
  check(response, {
    'status is OK': (r) => r && r.status === grpc.StatusOK,
    'allowed when authorizing': (r) => !expectAllowed || (r && r.message && r.message.allowed === true),
  });
}
