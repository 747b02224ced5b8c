use super::*;

fn every_message() -> Vec<Message> {
    vec![
        Message::Hello { versions: vec![1, 2], nonce: [7; 16] },
        Message::HelloReply { version: 1, nonce: [7; 16], agent: "cairn-agent 0.1.0".into() },
        Message::ListDisks,
        Message::Disks(vec![DiskInfo {
            name: "lun0".into(),
            size: 1 << 30,
            transport: "nbd".into(),
            serial: "".into(),
            snapshot_ready: false,
            reason: "mounted on /dev/nbd0 itself: wrap it (cairn-agent wrap) to snapshot it".into(),
        }]),
        Message::Prepare { disks: vec!["lun0".into()] },
        Message::Snapshot { disks: vec!["lun0".into(), "sdb".into()] },
        Message::Hashes { disk: "lun0".into(), first_block: 16, count: 2 },
        Message::HashList(vec![BlockHash::Zero, BlockHash::Blake3([9; 32])]),
        Message::Read { disk: "lun0".into(), offset: 65536, len: 65536 },
        Message::Data(vec![1, 2, 3]),
        Message::Release,
        Message::Done,
        Message::Error { code: 3, message: "no such disk".into() },
        Message::Bye,
        Message::OpenWrite { disk: "lun0".into() },
        Message::Write { offset: 4096, data: vec![5; 10] },
        Message::Zero { offset: 0, len: 1 << 20 },
        Message::CloseWrite,
    ]
}

#[test]
fn every_message_comes_back_as_it_was_sent() {
    let mut stream = Vec::new();
    for (id, m) in every_message().iter().enumerate() {
        write_frame(&mut stream, id as u32, m).unwrap();
    }
    let mut r = &stream[..];
    for (id, m) in every_message().iter().enumerate() {
        assert_eq!(read_frame(&mut r).unwrap(), (id as u32, m.clone()));
    }
    assert!(r.is_empty());
}

#[test]
fn bounds_are_kept_on_both_sides() {
    // What a sender may not send.
    for m in [
        Message::Read { disk: "lun0".into(), offset: 0, len: MAX_READ + 1 },
        Message::Read { disk: "../etc".into(), offset: 0, len: 1 },
        Message::Hashes { disk: "lun0".into(), first_block: 0, count: MAX_HASHES + 1 },
        Message::Data(vec![0; MAX_READ as usize + 1]),
        Message::Hello { versions: vec![], nonce: [0; 16] },
        Message::Error { code: 1, message: "x".repeat(MAX_TEXT + 1) },
    ] {
        assert!(m.encode().is_err(), "{:?} was encoded", m.kind());
    }
    // What a receiver refuses: a frame over the limit (before reading its payload), an unknown
    // kind, flags, bytes left over, a name that is not one, a count over the limit.
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&MAGIC);
    head[4..6].copy_from_slice(&(Kind::Data as u16).to_le_bytes());
    head[12..16].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    assert!(matches!(Header::parse(&head), Err(ProtoError::TooLong(_))));
    head[12..16].copy_from_slice(&0u32.to_le_bytes());
    head[4..6].copy_from_slice(&99u16.to_le_bytes());
    assert!(matches!(Header::parse(&head), Err(ProtoError::UnknownKind(99))));
    head[4..6].copy_from_slice(&(Kind::Done as u16).to_le_bytes());
    head[6] = 1;
    assert!(matches!(Header::parse(&head), Err(ProtoError::Flags(1))));
    assert!(Message::decode(Kind::Done, &[0]).is_err(), "a byte left over was accepted");
    let mut bad_name = Vec::new();
    bad_name.extend_from_slice(&5u16.to_le_bytes());
    bad_name.extend_from_slice(b"a/../");
    bad_name.extend_from_slice(&0u64.to_le_bytes());
    bad_name.extend_from_slice(&1u32.to_le_bytes());
    assert!(Message::decode(Kind::Read, &bad_name).is_err());
    assert!(Message::decode(Kind::HashList, &(MAX_HASHES + 1).to_le_bytes()).is_err());
    // A count claiming more than the payload holds: refused, nothing allocated for it.
    assert!(Message::decode(Kind::HashList, &MAX_HASHES.to_le_bytes()).is_err());
    assert!(!safe_name(".hidden") && !safe_name("") && !safe_name(&"a".repeat(MAX_NAME + 1)) && safe_name("nbd0"));
}

#[test]
fn a_session_starts_after_whatever_an_earlier_one_left_in_the_port() {
    let nonce = [42; 16];
    let mut port = Vec::new();
    // An earlier session's leftovers: half a frame, garbage, a whole reply to an old hello.
    port.extend_from_slice(&MAGIC);
    port.extend_from_slice(&[9, 9, 9]);
    port.extend_from_slice(b"noise noise");
    write_frame(&mut port, 5, &Message::HelloReply { version: 1, nonce: [1; 16], agent: "old".into() }).unwrap();
    write_frame(&mut port, 6, &Message::Data(vec![0xAB; 100])).unwrap();
    write_frame(&mut port, 0, &Message::HelloReply { version: 1, nonce, agent: "cairn-agent".into() }).unwrap();
    write_frame(&mut port, 1, &Message::Done).unwrap();
    let mut r = &port[..];
    let hello = resync(&mut r, &nonce).unwrap();
    assert_eq!(hello, Message::HelloReply { version: 1, nonce, agent: "cairn-agent".into() });
    // The stream goes on right after it.
    assert_eq!(read_frame(&mut r).unwrap(), (1, Message::Done));
    // Without a reply, the skipping is bounded (here by the end of the stream).
    let mut r = &b"CAG1 no reply here"[..];
    assert!(resync(&mut r, &nonce).is_err());
}

#[test]
fn a_reply_must_be_the_answer_of_its_request_to_the_byte() {
    let read = Message::Read { disk: "lun0".into(), offset: 0, len: 4096 };
    assert!(check_reply(3, &read, 3, &Message::Data(vec![0; 4096])).is_ok());
    assert!(check_reply(3, &read, 3, &Message::Data(vec![0; 4095])).is_err(), "a short read was taken");
    assert!(check_reply(3, &read, 4, &Message::Data(vec![0; 4096])).is_err(), "another request's reply was taken");
    assert!(check_reply(3, &read, 3, &Message::Done).is_err());
    assert!(check_reply(3, &read, 3, &Message::Error { code: 1, message: "I/O error".into() }).is_ok());
    let hashes = Message::Hashes { disk: "lun0".into(), first_block: 0, count: 2 };
    assert!(check_reply(1, &hashes, 1, &Message::HashList(vec![BlockHash::Zero])).is_err());
    let hello = Message::Hello { versions: vec![1], nonce: [5; 16] };
    let other = Message::HelloReply { version: 2, nonce: [5; 16], agent: "x".into() };
    assert!(check_reply(0, &hello, 0, &other).is_err(), "a version not offered was taken");
}
