//! Property tests of the frame decoder and message parsing over arbitrary
//! bytes: whatever a guest sends, decoding returns a value or an error and
//! never panics, and never buffers more than one frame.

use airlock_proto::{frame, AgentMode, FrameDecoder, GuestMessage, Hello, HostMessage};
use proptest::prelude::*;

const MAX: usize = 4096;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoder_survives_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..8192),
                                        chunk in 1usize..300) {
        let mut dec = FrameDecoder::new(MAX);
        for piece in data.chunks(chunk) {
            dec.push(piece);
            loop {
                match dec.next_message::<GuestMessage>() {
                    Ok(Some(msg)) => {
                        if let GuestMessage::Hello(h) = &msg { let _ = h.validate(); }
                    }
                    Ok(None) => break,
                    Err(_) => break,
                }
            }
            prop_assert!(dec.buffered() <= frame::HEADER_LEN + MAX + chunk);
        }
    }

    #[test]
    fn valid_frames_in_arbitrary_chunks_round_trip(ids in proptest::collection::vec(any::<u64>(), 1..20),
                                                   chunk in 1usize..64) {
        let msgs: Vec<HostMessage> = ids.iter().map(|&id| HostMessage::Request(airlock_proto::Request {
            id, op: airlock_proto::Operation::Status })).collect();
        let mut wire = Vec::new();
        for m in &msgs { wire.extend(frame::encode(m, MAX).unwrap()); }
        let mut dec = FrameDecoder::new(MAX);
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            dec.push(piece);
            while let Some(m) = dec.next_message::<HostMessage>().unwrap() { got.push(m); }
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn payload_parse_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = frame::decode_payload::<GuestMessage>(&payload);
        let _ = frame::decode_payload::<HostMessage>(&payload);
        let _ = airlock_proto::salvage_request_id(&payload);
    }

    #[test]
    fn hello_validation_bounds_strings(version in ".{0,300}", caps in proptest::collection::vec(".{0,80}", 0..100)) {
        let h = Hello {
            protocol_version: 1, agent_version: version.clone(), build_id: "ab12".into(),
            boot_id: "x".into(), mode: AgentMode::Pid1, uptime_at_start_ms: 1,
            uptime_at_hello_ms: 2, connection_seq: 0, capabilities: caps.clone(),
        };
        if h.validate().is_ok() {
            prop_assert!(version.len() <= 128 && caps.len() <= 64);
        }
    }
}

#[test]
fn hello_json_shape_is_camel_case_and_tagged() {
    let h = GuestMessage::Hello(Hello {
        protocol_version: 1,
        agent_version: "0.1.0".into(),
        build_id: "abcd".into(),
        boot_id: "b".into(),
        mode: AgentMode::Pid1,
        uptime_at_start_ms: 10,
        uptime_at_hello_ms: 20,
        connection_seq: 0,
        capabilities: vec!["exec".into()],
    });
    let v: serde_json::Value = serde_json::to_value(&h).unwrap();
    assert_eq!(v["type"], "hello");
    assert_eq!(v["protocolVersion"], 1);
    assert_eq!(v["mode"], "pid1");
}

#[test]
fn unknown_operation_is_a_parse_error_but_its_id_is_salvaged() {
    let raw = br#"{"type":"request","id":7,"op":{"op":"teleport","args":{}}}"#;
    assert!(frame::decode_payload::<HostMessage>(raw).is_err());
    assert_eq!(airlock_proto::salvage_request_id(raw), Some(7));
}
