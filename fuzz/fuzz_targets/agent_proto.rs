//! Frames from a guest agent (`cairn-agent-proto`): what a guest, maybe a hostile one, writes to
//! its virtio-serial port. Oracles: reading never panics nor allocates past the bounds (the
//! length is checked before the payload is read); a frame that decodes encodes back to the same
//! message; a session's resync returns nothing but a hello reply echoing its nonce.
#![no_main]
use cairn_agent_proto::{read_frame, resync, write_frame, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok((id, m)) = read_frame(&mut r) {
        let mut again = Vec::new();
        write_frame(&mut again, id, &m).expect("a decoded message encodes");
        assert_eq!(read_frame(&mut &again[..]).unwrap(), (id, m));
    }
    let nonce = [0x5a; 16];
    if let Ok(m) = resync(&mut &data[..], &nonce) {
        assert!(matches!(m, Message::HelloReply { nonce: n, .. } if n == nonce));
    }
});
