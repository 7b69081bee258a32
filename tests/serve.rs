//! `kiln serve` as users start it: the binary on a loopback port, called from Rust (tonic)
//! and from Python (grpcio, stubs generated from `proto/` alone).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::serve::proto::generator_client::GeneratorClient;
use kiln::serve::proto::{self, GenerateRequest, ModelInfoRequest, SamplingParameters};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A `kiln serve` process; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    metrics: String,
    /// The HTTP API's base URL (empty without `--http-addr`).
    http: String,
}

impl Server {
    /// Starts `kiln serve` on the int4 artifact with free ports and waits until it serves.
    fn start(extra: &[&str]) -> Server {
        let artifact = common::artifact("int4");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg(&artifact)
            .args(["--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--threads", "2"])
            .args(extra)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("kiln serve starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut addr, mut metrics, mut http) = (String::new(), String::new(), String::new());
        for line in lines.by_ref() {
            let line = line.expect("stdout line");
            if let Some(a) = line.strip_prefix("kiln serve: listening on ") {
                addr = a.to_string();
            } else if let Some(m) = line.strip_prefix("kiln serve: metrics on ") {
                metrics = m.to_string();
            } else if let Some(h) = line.strip_prefix("kiln serve: http on ") {
                http = h.to_string();
            } else if line == "kiln serve: serving" {
                break;
            }
        }
        assert!(!addr.is_empty() && !metrics.is_empty(), "kiln serve printed its addresses");
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, addr, metrics, http }
    }

    async fn client(&self) -> GeneratorClient<Channel> {
        let channel =
            Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect");
        GeneratorClient::new(channel).max_encoding_message_size(usize::MAX)
    }

    async fn health(&self) -> i32 {
        let channel =
            Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect");
        let r = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.expect("health");
        r.into_inner().status
    }

    /// CPU time the server process has used, in clock ticks (user + system).
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("proc stat");
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace().nth(1).expect("value").parse().expect("kB")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(t: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest { text: t.into(), max_tokens: Some(max_tokens), ..Default::default() }
}

/// Runs a request to its end: text, token ids and the last message's `finished`.
async fn complete(
    client: &mut GeneratorClient<Channel>,
    r: GenerateRequest,
) -> Result<(String, Vec<u32>, proto::Finished), tonic::Status> {
    let mut stream = client.generate(r).await?.into_inner();
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(msg) = stream.message().await? {
        text.push_str(&msg.text);
        ids.extend(msg.tokens.iter().map(|t| t.id));
        if let Some(f) = msg.finished {
            return Ok((text, ids, f));
        }
    }
    Err(tonic::Status::internal("the stream ended without a finished message"))
}

async fn wait_idle(client: &mut GeneratorClient<Channel>) -> proto::ModelInfoResponse {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let info = client.model_info(ModelInfoRequest {}).await.expect("model info").into_inner();
        if (info.active_sequences == 0 && info.queued_requests == 0) || Instant::now() > end {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const PROMPTS: [&str; 4] =
    ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"];

/// `kiln generate --json` on the int4 artifact, greedy at accuracy level 1.
fn generate(prompt: &str, max_tokens: u32, extra: &[&str]) -> serde_json::Value {
    let artifact = common::artifact("int4");
    let n = max_tokens.to_string();
    let mut args = vec!["generate", artifact.to_str().expect("utf-8"), "--prompt", prompt, "-n", &n];
    args.extend(["--threads", "2", "--accuracy-level", "1", "--json"]);
    args.extend(extra);
    let out = common::kiln(&args);
    assert!(out.status.success(), "kiln generate: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("generate --json")
}

/// Python stubs generated from our proto into `dir/stubs`, as clients/python/README.md shows.
fn python_stubs(dir: &std::path::Path) -> std::path::PathBuf {
    let stubs = dir.join("stubs");
    std::fs::create_dir(&stubs).expect("mkdir");
    let proto_dir = common::repo().join("proto");
    let gen = Command::new(common::python())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_dir)
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto_dir.join("kiln/v1/kiln.proto"))
        .output()
        .expect("grpc_tools runs");
    assert!(gen.status.success(), "grpc_tools.protoc: {}", String::from_utf8_lossy(&gen.stderr));
    stubs
}

/// Runs `clients/python/SCRIPT ARGS` with the stubs on its path; asserts it passed.
fn run_python(script: &str, args: &[&str], stubs: &std::path::Path) {
    let clients = common::repo().join("clients/python");
    let out = Command::new(common::python())
        .arg(clients.join(script))
        .args(args)
        .env("PYTHONPATH", format!("{}:{}", stubs.display(), clients.display()))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn python_client_streams_cancels_and_sees_errors() {
    // Exact f32 products (accuracy level 1), so speculative output must equal plain output.
    let server = Server::start(&["--accuracy-level", "1"]);
    // Long enough to stream in many pieces and to give prompt lookup repeats to draft from.
    let (prompt, max_tokens) = (PROMPTS[0], 200);
    let cli = generate(prompt, max_tokens, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = dir.path().join("expected.json");
    let doc = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "text": cli["text"]});
    std::fs::write(&expected, doc.to_string()).expect("write");
    let stubs = python_stubs(dir.path());
    let expected = expected.to_str().expect("utf-8");
    run_python("test_service.py", &[&server.addr, &server.metrics, expected], &stubs);
}

#[test]
fn openai_sdk_and_raw_http_against_the_http_api() {
    // Exact f32 products (accuracy level 1): batched rows equal the same request alone.
    let server = Server::start(&["--accuracy-level", "1", "--http-addr", "127.0.0.1:0"]);
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("data/smollm2-135m.reference.json")).expect("reference JSON");
    let mut prompts = Vec::new();
    for case in reference["prompts"].as_array().expect("prompts") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let cli = generate(prompt, 48, &[]);
        prompts.push(serde_json::json!({
            "prompt": prompt, "ids": case["ids"], "max_tokens": 48,
            "text": cli["text"], "token_ids": cli["token_ids"],
        }));
    }
    let content = "What is 2+2?";
    let chat = generate(content, 24, &["--chat"]);
    let doc = serde_json::json!({
        "model": "int4",
        "prompts": prompts,
        "chat": {"content": content, "max_tokens": 24, "text": chat["text"], "token_ids": chat["token_ids"]},
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, doc.to_string()).expect("write");
    let stubs = python_stubs(dir.path());
    let expected = expected.to_str().expect("utf-8");
    run_python("test_openai.py", &[&server.http, &server.addr, &server.metrics, expected], &stubs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_streams_then_a_hundred_cancelled() {
    let server = Server::start(&["--max-sequences", "8", "--context", "512"]);
    let mut client = server.client().await;
    // Mixed lengths and parameters; the greedy ones are compared with their runs alone.
    let request = |i: usize| {
        let mut r = text(PROMPTS[i % PROMPTS.len()], [8, 24, 48, 16][i % 4]);
        match i % 4 {
            1 => {
                r.sampling = Some(SamplingParameters {
                    temperature: Some(0.8),
                    seed: Some((i % 8) as u64),
                    ..Default::default()
                })
            }
            2 => r.top_logprobs = 3,
            3 => r.stop = vec!["\n\n".into()],
            _ => {}
        }
        r
    };
    let mut alone = Vec::new();
    for i in 0..8 {
        alone.push(complete(&mut client, request(i)).await.expect("alone"));
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { complete(&mut c, request(i)).await })
        })
        .collect();
    let mut tokens = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let (got_text, got_ids, f) = t.await.expect("task").unwrap_or_else(|e| panic!("stream {i}: {e}"));
        let (want_text, want_ids, _) = &alone[i % 8];
        assert_eq!((&got_ids, &got_text), (want_ids, want_text), "stream {i} differs from its run alone");
        tokens += f.usage.expect("usage").completion_tokens;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("32 streams: {tokens} tokens in {elapsed:.2} s, {:.1} tokens/s aggregate", tokens as f64 / elapsed);
    let info = wait_idle(&mut client).await;
    assert_eq!((info.active_sequences, info.queued_requests), (0, 0));
    let before = server.rss_kib();

    // 100 requests cancelled at random points: before the first token, mid-stream, queued.
    let mut seed = 0x9e37_79b9_u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let mut c = client.clone();
            let (after, delay) = (rand(12), rand(40));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let mut r = text(PROMPTS[i % PROMPTS.len()], 400);
                r.ignore_eos = true;
                let mut stream = match c.generate(r).await {
                    Ok(response) => response.into_inner(),
                    Err(s) if s.code() == Code::ResourceExhausted => return false,
                    Err(s) => panic!("request {i}: {s}"),
                };
                for _ in 0..after {
                    stream.message().await.expect("message").expect("the stream runs");
                }
                // Dropping the stream cancels the call.
                true
            })
        })
        .collect();
    let mut accepted = 0.0;
    for t in tasks {
        accepted += f64::from(u8::from(t.await.expect("task")));
    }
    let info = wait_idle(&mut client).await;
    assert_eq!((info.active_sequences, info.queued_requests), (0, 0), "every slot freed after the cancellations");
    let after = server.rss_kib();
    println!("RSS before the cancellations {} MiB, after {} MiB", before / 1024, after / 1024);
    assert!(after < before + 64 * 1024, "RSS grew from {before} KiB to {after} KiB");
    assert_eq!(server.health().await, 1, "health is still SERVING");
    let again = complete(&mut client, request(0)).await.expect("after");
    // ONNX Runtime's threads spin between kernels, never once a run is over.
    let ticks = server.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = server.cpu_ticks() - ticks;
    println!("CPU of the idle server in the second after its last request: {idle} clock ticks");
    assert!(idle <= 2, "the idle server used {idle} clock ticks of CPU in one second");
    assert_eq!(again.1, alone[0].1, "greedy output unchanged after the storm");
    let metrics = http_get(&server.metrics).await;
    let cancelled = metric(&metrics, "kiln_requests_total{protocol=\"grpc\",finish_reason=\"cancelled\"}");
    println!("{accepted} of 100 accepted (the rest found the queue full), {cancelled} cancellations counted");
    assert_eq!(cancelled, accepted, "every accepted request is counted as cancelled");
    assert!(accepted >= 64.0, "at least a queue's worth was accepted");
    assert_eq!(metric(&metrics, "kiln_active_sequences"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_their_status_codes() {
    let server = Server::start(&["--context", "256", "--max-tokens", "100", "--default-max-tokens", "16"]);
    let mut client = server.client().await;
    let sampling = |s: SamplingParameters| GenerateRequest { sampling: Some(s), ..text("hi", 4) };
    let chat = |role: &str| GenerateRequest {
        messages: vec![proto::ChatMessage { role: role.into(), content: "hi".into() }],
        max_tokens: Some(4),
        ..Default::default()
    };
    let cases: Vec<(&str, GenerateRequest, Code, &str)> = vec![
        ("empty input", GenerateRequest::default(), Code::InvalidArgument, "text:"),
        (
            "text and ids",
            GenerateRequest { token_ids: vec![1, 2], ..text("hi", 4) },
            Code::InvalidArgument,
            "token_ids:",
        ),
        ("max_tokens 0", text("hi", 0), Code::InvalidArgument, "max_tokens:"),
        ("max_tokens huge", text("hi", u32::MAX), Code::InvalidArgument, "max_tokens:"),
        (
            "temperature < 0",
            sampling(SamplingParameters { temperature: Some(-0.5), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.temperature:",
        ),
        (
            "top_p > 1",
            sampling(SamplingParameters { top_p: Some(1.01), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.top_p:",
        ),
        (
            "NaN",
            sampling(SamplingParameters { min_p: Some(f32::NAN), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.min_p:",
        ),
        ("unknown chat role", chat("wizard"), Code::InvalidArgument, "messages:"),
        (
            "prompt beyond context",
            GenerateRequest { token_ids: vec![100; 300], max_tokens: Some(4), ..Default::default() },
            Code::InvalidArgument,
            "token_ids: prompt of 300 tokens",
        ),
        (
            "token id outside the vocabulary",
            GenerateRequest { token_ids: vec![10_000_000], max_tokens: Some(4), ..Default::default() },
            Code::InvalidArgument,
            "token_ids:",
        ),
        (
            "unknown stop id",
            GenerateRequest { stop_token_ids: vec![10_000_000], ..text("hi", 4) },
            Code::InvalidArgument,
            "stop_token_ids:",
        ),
        (
            "draft model on a server without --draft",
            GenerateRequest {
                speculative: Some(proto::SpeculativeParameters {
                    enabled: true,
                    draft_tokens: 4,
                    drafter: "model".into(),
                }),
                ..text("hi", 4)
            },
            Code::InvalidArgument,
            "speculative.drafter:",
        ),
        (
            "draft length above 16",
            GenerateRequest {
                speculative: Some(proto::SpeculativeParameters {
                    enabled: true,
                    draft_tokens: 17,
                    ..Default::default()
                }),
                ..text("hi", 4)
            },
            Code::InvalidArgument,
            "speculative.draft_tokens:",
        ),
        ("100 MB message", text(&"a".repeat(100 << 20), 4), Code::OutOfRange, ""),
    ];
    for (what, request, code, prefix) in cases {
        let status = complete(&mut client, request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(status.message().starts_with(prefix), "{what}: {}", status.message());
    }
    let good = GenerateRequest { ignore_eos: true, ..text("The capital of France is", 8) };
    let (_, ids, f) = complete(&mut client, good).await.expect("a good request");
    assert_eq!(ids.len(), 8);
    assert_eq!(f.reason, proto::FinishReason::Length as i32);
    assert_eq!(server.health().await, 1, "health is still SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_queue_limits_and_the_drain_on_sigterm() {
    let mut server =
        Server::start(&["--max-sequences", "1", "--queue", "1", "--grace", "60", "--http-addr", "127.0.0.1:0"]);
    let mut client = server.client().await;
    // A deadline stops generation on the server too.
    let mut r = tonic::Request::new(GenerateRequest { ignore_eos: true, ..text("Once upon a time", 2000) });
    r.set_timeout(Duration::from_millis(400));
    let mut stream = client.generate(r).await.expect("started").into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended before its deadline"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{}", status.message());
    let info = wait_idle(&mut client).await;
    assert_eq!(info.active_sequences, 0, "the expired request left its slot");

    // One slot, one queue place: the third request is RESOURCE_EXHAUSTED. Long enough that
    // the first still runs while the second queues and the third is refused, on any machine.
    let long = || GenerateRequest { ignore_eos: true, ..text("Once upon a time", 200) };
    let mut first = client.generate(long()).await.expect("first").into_inner();
    first.message().await.expect("first message");
    let second = tokio::spawn({
        let mut c = client.clone();
        async move { complete(&mut c, long()).await }
    });
    let end = Instant::now() + Duration::from_secs(10);
    while client.model_info(ModelInfoRequest {}).await.expect("info").into_inner().queued_requests == 0 {
        assert!(Instant::now() < end, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let third = complete(&mut client, long()).await.expect_err("queue full");
    assert_eq!(third.code(), Code::ResourceExhausted, "{}", third.message());
    // The HTTP API shares the queue: 429 with OpenAI's error object.
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 5}"#;
    let (code, err) = http_post(&server.http, "/v1/completions", body).await;
    assert_eq!((code, err["error"]["code"].as_str()), (429, Some("queue_full")), "{err}");

    // SIGTERM: new requests are refused, the open streams finish, the process exits 0.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let end = Instant::now() + Duration::from_secs(10);
    // Until the signal lands the queue is full (RESOURCE_EXHAUSTED); then UNAVAILABLE.
    let refused = loop {
        match complete(&mut client, text("hi", 2)).await {
            Err(s) if s.code() != Code::ResourceExhausted => break s,
            _ => assert!(Instant::now() < end, "requests are still accepted after SIGTERM"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    let (code, err) = http_post(&server.http, "/v1/completions", body).await;
    assert_eq!((code, err["error"]["type"].as_str()), (503, Some("service_unavailable")), "{err}");
    let mut n = 0;
    let finished = loop {
        let msg = first.message().await.expect("first stream").expect("a message");
        n += msg.tokens.len();
        if let Some(f) = msg.finished {
            break f;
        }
    };
    assert_eq!(finished.reason, proto::FinishReason::Length as i32, "the open stream ran to its end");
    assert!(n > 0);
    let (_, ids, _) = second.await.expect("task").expect("the queued request ran during the drain");
    assert_eq!(ids.len(), 200);
    let status = server.child.wait().expect("wait");
    assert!(status.success(), "kiln serve exits 0 after draining: {status}");
}

async fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// POSTs JSON `body` to the HTTP API; the status and the JSON answer.
async fn http_post(base: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.strip_prefix("http://").expect("http url");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(format!("{head}{body}").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line: {out}"));
    let (_, json) = out.split_once("\r\n\r\n").expect("head and body");
    (code, serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
}

fn metric(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_echo_logprobs_chat_and_stops() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = Server::start(&[]);
    // Reflection lists the services, so grpcurl needs no proto files.
    let channel =
        Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect().await.expect("connect");
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers.message().await.expect("answer").expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("{answer:?}") };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "kiln.v1.Generator"]);

    let mut client = server.client().await;
    let prompt = "The capital of France is";
    let ids = client
        .tokenize(proto::TokenizeRequest { text: prompt.into(), add_special_tokens: true })
        .await
        .expect("tokenize")
        .into_inner();
    assert_eq!(ids.token_ids.len(), ids.pieces.len());
    // Echo and log-probabilities; text and token ids give the same continuation.
    // The model may end its answer early ("Paris, France."): these requests run to their length.
    let long = |n| GenerateRequest { ignore_eos: true, ..text(prompt, n) };
    let r = GenerateRequest { echo: true, top_logprobs: 3, ..long(12) };
    let mut stream = client.generate(r).await.expect("generate").into_inner();
    let first = stream.message().await.expect("first").expect("a message");
    assert_eq!(first.prompt_token_ids, ids.token_ids, "echo sends the prompt's ids first");
    let mut tokens = first.tokens;
    while let Some(msg) = stream.message().await.expect("message") {
        assert!(msg.prompt_token_ids.is_empty(), "the prompt comes once");
        tokens.extend(msg.tokens);
    }
    assert_eq!(tokens.len(), 12);
    for t in &tokens {
        let lp = t.logprob.expect("logprob");
        assert_eq!(t.top_logprobs.len(), 3);
        assert_eq!(t.top_logprobs[0].id, t.id, "greedy picks the most likely token");
        assert!((t.top_logprobs[0].logprob - lp).abs() < 1e-6 && lp <= 0.0);
        assert!(t.top_logprobs.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }
    let by_ids = GenerateRequest { token_ids: ids.token_ids.clone(), text: String::new(), ..long(12) };
    let (_, got, _) = complete(&mut client, by_ids).await.expect("by ids");
    assert_eq!(got, tokens.iter().map(|t| t.id).collect::<Vec<_>>());

    // A stop string cuts the text and is reported.
    let (full, _, _) = complete(&mut client, long(24)).await.expect("full");
    let word = full.split_whitespace().nth(2).expect("three words").to_string();
    let (cut, _, f) =
        complete(&mut client, GenerateRequest { stop: vec![word.clone()], ..long(24) }).await.expect("stopped");
    assert_eq!(f.reason, proto::FinishReason::Stop as i32);
    assert_eq!(f.stop, word);
    assert_eq!(cut, full[..full.find(&word).expect("word")], "text ends before the stop string");

    // Chat messages go through the model's template.
    let chat = GenerateRequest {
        messages: vec![proto::ChatMessage { role: "user".into(), content: "Say hello.".into() }],
        max_tokens: Some(8),
        ..Default::default()
    };
    let (reply, reply_ids, f) = complete(&mut client, chat).await.expect("chat");
    assert!(!reply.trim().is_empty() && !reply_ids.is_empty(), "{reply:?}");
    assert!(f.usage.expect("usage").prompt_tokens > 5, "the template wraps the message");
    let text_back = client
        .detokenize(proto::DetokenizeRequest { token_ids: reply_ids, skip_special_tokens: true })
        .await
        .expect("detokenize")
        .into_inner()
        .text;
    assert_eq!(text_back, reply);
}
