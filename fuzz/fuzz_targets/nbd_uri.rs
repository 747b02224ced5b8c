//! NBD URIs as an operator or a hypervisor gives them (`NbdAddress::parse`): never a panic, and
//! an address that parses prints as a URI that parses back to the same address.
#![no_main]
use cairn_nbd::NbdAddress;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(a) = NbdAddress::parse(s) {
        let printed = a.to_string();
        match NbdAddress::parse(&printed) {
            Ok(again) => assert_eq!(again, a, "{s:?} printed as {printed:?}"),
            Err(e) => panic!("{s:?} printed as {printed:?}, which does not parse: {e}"),
        }
    }
});
