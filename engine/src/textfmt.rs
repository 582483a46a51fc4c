//! Addresses and numbers written fast: the renderer writes 300,000 map elements and the tracer
//! builds lookup keys per packet, and `core::fmt`'s padding machinery dominates both.

use std::fmt;
use std::net::IpAddr;

/// A number written with one `write_str`, not the formatter's padding machinery.
pub struct FastNum(pub u32);
impl fmt::Display for FastNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 10];
        let mut i = buf.len();
        let mut n = self.0;
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        f.write_str(std::str::from_utf8(&buf[i..]).map_err(|_| fmt::Error)?)
    }
}

/// IPv4 addresses written octet by octet from a table: the render's hot path.
pub struct FastIp(pub IpAddr);
impl fmt::Display for FastIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => {
                // Assemble the text on the stack and hand it over in one `write_str`.
                let mut buf = [0u8; 15];
                let mut n = 0;
                for (i, o) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        buf[n] = b'.';
                        n += 1;
                    }
                    let d = OCTETS[*o as usize].as_bytes();
                    buf[n..n + d.len()].copy_from_slice(d);
                    n += d.len();
                }
                f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
            }
            IpAddr::V6(v6) => write!(f, "{v6}"),
        }
    }
}

const OCTETS: [&str; 256] = {
    const DIGITS: &[u8; 768] = &{
        let mut d = [0u8; 768];
        let mut i = 0;
        while i < 256 {
            d[i * 3] = b'0' + (i / 100) as u8;
            d[i * 3 + 1] = b'0' + (i / 10 % 10) as u8;
            d[i * 3 + 2] = b'0' + (i % 10) as u8;
            i += 1;
        }
        d
    };
    let mut t = [""; 256];
    let mut i = 0;
    while i < 256 {
        let skip = if i >= 100 {
            0
        } else if i >= 10 {
            1
        } else {
            2
        };
        let bytes = DIGITS.split_at(i * 3 + skip).1.split_at(3 - skip).0;
        t[i] = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(_) => "",
        };
        i += 1;
    }
    t
};
