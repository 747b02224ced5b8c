//! Frames from a guest agent (`cairn-agent-proto`): what a guest, maybe a hostile one, writes to
//! its virtio-serial port, and what a host (or an earlier session) leaves in it for the agent.
//! Oracles: reading never panics nor allocates past the bounds (the length is checked before the
//! payload is read); a frame that decodes encodes back to the same message; a session's resync
//! returns nothing but a hello reply echoing its nonce; the agent's scan returns only a hello; a
//! reply `check_reply` accepts has exactly the size its request asked for.
#![no_main]
use cairn_agent_proto::{check_reply, read_frame, resync, scan, write_frame, Kind, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let requests = [
        Message::Read { disk: "lun0".into(), offset: 0, len: 4096 },
        Message::Hashes { disk: "lun0".into(), first_block: 0, count: 3 },
        Message::ListDisks,
        Message::Snapshot { disks: vec!["lun0".into()] },
    ];
    let mut r = data;
    while let Ok((id, m)) = read_frame(&mut r) {
        let mut again = Vec::new();
        write_frame(&mut again, id, &m).expect("a decoded message encodes");
        assert_eq!(read_frame(&mut &again[..]).unwrap(), (id, m.clone()));
        for q in &requests {
            if check_reply(id, q, id, &m).is_ok() {
                match (q, &m) {
                    (_, Message::Error { .. }) => {}
                    (Message::Read { len, .. }, Message::Data(d)) => assert_eq!(d.len(), *len as usize),
                    (Message::Hashes { count, .. }, Message::HashList(h)) => assert_eq!(h.len(), *count as usize),
                    (Message::ListDisks, Message::Disks(_)) | (Message::Snapshot { .. }, Message::Done) => {}
                    _ => panic!("{m:?} accepted as the answer to {q:?}"),
                }
            }
        }
    }
    let nonce = [0x5a; 16];
    if let Ok(m) = resync(&mut &data[..], &nonce) {
        assert!(matches!(m, Message::HelloReply { nonce: n, .. } if n == nonce));
    }
    if let Ok((_, m)) = scan(&mut &data[..], |h| h.kind == Kind::Hello && h.len <= 64, |_| true) {
        assert!(matches!(m, Message::Hello { .. }));
    }
});
