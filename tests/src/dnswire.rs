//! Just enough of the DNS wire format for the test clients to ask for an A
//! record and read the answer (the agent's own parser is what is under test).

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};

/// A recursive query for the A record of `name`, with message id `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    message
}

/// The first A record of the response to query `id` (names compressed or not).
pub fn first_a_record(message: &[u8], id: u16) -> Result<Ipv4Addr> {
    ensure!(
        message.len() >= 12 && message[..2] == id.to_be_bytes(),
        "not our answer"
    );
    let answers = u16::from_be_bytes([message[6], message[7]]);
    let mut at = skip_name(message, 12)? + 4;
    for _ in 0..answers {
        at = skip_name(message, at)?;
        let header = message.get(at..at + 10).context("truncated record")?;
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[8], header[9]]));
        let data = message
            .get(at + 10..at + 10 + length)
            .context("truncated data")?;
        if kind == 1 && length == 4 {
            return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + length;
    }
    bail!("no A record in the answer")
}

fn skip_name(message: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let length = *message.get(at).context("truncated name")?;
        if length & 0xc0 == 0xc0 {
            return Ok(at + 2);
        }
        at += 1 + usize::from(length);
        if length == 0 {
            return Ok(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_answer_with_a_compressed_name() {
        let mut answer = query(7, "a.test");
        answer[2] = 0x81;
        answer[7] = 1;
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 2]);
        assert_eq!(
            first_a_record(&answer, 7).unwrap(),
            Ipv4Addr::new(198, 18, 0, 2)
        );
        assert!(first_a_record(&answer, 8).is_err());
    }
}
