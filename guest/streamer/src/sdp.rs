//! Reading a viewer's SDP offer: which codec to send and under which RTP
//! payload type, and the ICE credentials (to tell an ICE restart).
//!
//! `viewer` calls [`parse`] and [`choose`] for every offer; the payloader's
//! `pt` and the caps on `webrtcbin`'s sink pad come from the [`Choice`].

use airlock_proto::stream::Codec;
use gstreamer_sdp as gst_sdp;

/// Why an offer cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdpError {
    /// The text is not SDP.
    #[error("the offer is not valid SDP")]
    Unparsable,
    /// No usable video m-line.
    #[error("the offer has no video m-line")]
    NoVideo,
    /// The video m-line offers neither VP8 nor H.264.
    #[error("the offer's video accepts neither VP8 nor H.264")]
    NoCodec,
}

/// What to send a viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The codec.
    pub codec: Codec,
    /// The payload type the offer gave it.
    pub payload: u8,
    /// Index of the video m-line.
    pub mline: u32,
    /// The id the offer gave the playout-delay header extension, if any.
    pub playout_delay: Option<u8>,
}

/// The RTP header extension by which a sender tells Chromium how long it
/// may buffer frames before showing them; 0/0 selects its low-latency
/// renderer (frames shown as soon as they are decoded).
pub const PLAYOUT_DELAY_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay";

/// The id of the header extension `uri` in `media` (`a=extmap:<id> <uri>`),
/// when it fits a one-byte header (1-14).
pub fn extmap_id(media: &gst_sdp::SDPMediaRef, uri: &str) -> Option<u8> {
    media.attributes().find_map(|a| {
        if a.key() != "extmap" {
            return None;
        }
        let mut parts = a.value()?.split_whitespace();
        let id = parts.next()?.split('/').next()?.parse::<u8>().ok()?;
        (parts.next() == Some(uri) && (1..=14).contains(&id)).then_some(id)
    })
}

/// Parses SDP text. Trailing blanks are trimmed from every line first:
/// some stacks write `a=rtcp-fb:96 nack ` (webrtc-rs does), which
/// GStreamer would read as an unknown feedback type and so answer without
/// NACK.
pub fn parse(text: &str) -> Result<gst_sdp::SDPMessage, SdpError> {
    let mut clean = String::with_capacity(text.len());
    for line in text.lines() {
        clean.push_str(line.trim_end());
        clean.push_str("\r\n");
    }
    gst_sdp::SDPMessage::parse_buffer(clean.as_bytes()).map_err(|_| SdpError::Unparsable)
}

/// Picks the codec for the first video m-line that is not rejected: the
/// wanted one when offered, else VP8, else H.264.
pub fn choose(sdp: &gst_sdp::SDPMessageRef, wanted: Option<Codec>) -> Result<Choice, SdpError> {
    let (mline, media) = sdp
        .medias()
        .enumerate()
        .find(|(_, m)| m.media() == Some("video") && m.port() != 0)
        .ok_or(SdpError::NoVideo)?;
    let offered = offered_codecs(media);
    let pick = |codec| {
        offered
            .iter()
            .filter(|o| o.codec == codec)
            .max_by_key(|o| o.rank)
            .map(|o| o.payload)
    };
    let order = match wanted {
        Some(Codec::H264) => [Codec::H264, Codec::Vp8],
        _ => [Codec::Vp8, Codec::H264],
    };
    order
        .into_iter()
        .find_map(|codec| pick(codec).map(|payload| (codec, payload)))
        .map(|(codec, payload)| Choice {
            codec,
            payload,
            mline: mline as u32,
            playout_delay: extmap_id(media, PLAYOUT_DELAY_URI),
        })
        .ok_or(SdpError::NoCodec)
}

/// The ICE username fragment of the offer (media level first, then
/// session level): a new one means the viewer restarted ICE.
pub fn ice_ufrag(sdp: &gst_sdp::SDPMessageRef) -> Option<String> {
    sdp.medias()
        .find_map(|m| m.attribute_val("ice-ufrag"))
        .or_else(|| sdp.attribute_val("ice-ufrag"))
        .map(str::to_owned)
}

/// Replaces the ICE credentials everywhere in an SDP (every m-line and the
/// session level, wherever they appear).
pub fn set_ice_credentials(sdp: &mut gst_sdp::SDPMessageRef, ufrag: &str, pwd: &str) {
    for media in sdp.medias_mut() {
        for (idx, attr) in ice_replacements(media.attributes(), ufrag, pwd) {
            let _ = media.replace_attribute(idx, attr);
        }
    }
    for (idx, attr) in ice_replacements(sdp.attributes(), ufrag, pwd) {
        let _ = sdp.replace_attribute(idx, attr);
    }
}

/// The index and new value of each `ice-ufrag` / `ice-pwd` attribute.
fn ice_replacements<'a>(
    attributes: impl Iterator<Item = &'a gst_sdp::SDPAttribute>,
    ufrag: &str,
    pwd: &str,
) -> Vec<(u32, gst_sdp::SDPAttribute)> {
    attributes
        .enumerate()
        .filter_map(|(idx, a)| {
            let value = match a.key() {
                "ice-ufrag" => ufrag,
                "ice-pwd" => pwd,
                _ => return None,
            };
            Some((idx as u32, gst_sdp::SDPAttribute::new(a.key(), Some(value))))
        })
        .collect()
}

#[derive(Debug)]
struct Offered {
    codec: Codec,
    payload: u8,
    /// Higher is better among payload types of the same codec.
    rank: u8,
}

/// Every VP8 or H.264 payload type of an m-line, in the offer's order.
fn offered_codecs(media: &gst_sdp::SDPMediaRef) -> Vec<Offered> {
    media
        .attributes()
        .filter(|a| a.key() == "rtpmap")
        .filter_map(|a| rtpmap(a.value()?))
        .filter_map(|(payload, name)| {
            let codec = match name.to_ascii_uppercase().as_str() {
                "VP8/90000" => Codec::Vp8,
                "H264/90000" => Codec::H264,
                _ => return None,
            };
            let rank = match codec {
                Codec::Vp8 => 0,
                Codec::H264 => h264_rank(fmtp(media, payload).unwrap_or_default()),
            };
            Some(Offered {
                codec,
                payload,
                rank,
            })
        })
        .collect()
}

/// `96 VP8/90000` → (96, "VP8/90000"). Dynamic payload types only.
fn rtpmap(value: &str) -> Option<(u8, &str)> {
    let (pt, name) = value.split_once(' ')?;
    let pt: u8 = pt.trim().parse().ok()?;
    (96..=127).contains(&pt).then_some((pt, name.trim()))
}

fn fmtp(media: &gst_sdp::SDPMediaRef, payload: u8) -> Option<&str> {
    media
        .attributes()
        .filter(|a| a.key() == "fmtp")
        .filter_map(|a| a.value())
        .find_map(|v| {
            let (pt, params) = v.split_once(' ')?;
            (pt.trim().parse::<u8>().ok()? == payload).then_some(params)
        })
}

/// Constrained baseline with packetization mode 1 is what x264enc sends and
/// every browser decodes; other profiles still decode a baseline stream.
fn h264_rank(params: &str) -> u8 {
    let value = |key: &str| {
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let mode1 = value("packetization-mode").as_deref() == Some("1");
    let baseline = value("profile-level-id").is_some_and(|p| p.starts_with("42"));
    u8::from(mode1) * 2 + u8::from(baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses test SDP (GStreamer must be initialised first).
    fn sdp(text: &str) -> Result<gst_sdp::SDPMessage, SdpError> {
        gstreamer::init().expect("GStreamer initialises");
        parse(text)
    }

    fn offer(video: &str) -> gst_sdp::SDPMessage {
        let text = format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
             a=group:BUNDLE 0 1\r\n{video}\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n\
             a=mid:1\r\na=sctp-port:5000\r\n"
        );
        sdp(&text).expect("test SDP parses")
    }

    const BROWSER_VIDEO: &str = "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 125\r\n\
        c=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=ice-ufrag:abcd\r\n\
        a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\n\
        a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
        a=rtpmap:102 H264/90000\r\n\
        a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f\r\n\
        a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n\
        a=rtpmap:125 H264/90000\r\n\
        a=fmtp:125 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n";

    #[test]
    fn vp8_is_the_default_with_the_offer_payload_type() {
        let choice = choose(&offer(BROWSER_VIDEO), None).unwrap();
        assert_eq!(
            choice,
            Choice {
                codec: Codec::Vp8,
                payload: 96,
                mline: 0,
                playout_delay: None,
            }
        );
    }

    #[test]
    fn the_playout_delay_extension_id_is_read_from_the_offer() {
        let text = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
                    m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n\
                    a=extmap:3 urn:ietf:params:rtp-hdrext:toffset\r\n\
                    a=extmap:12 http://www.webrtc.org/experiments/rtp-hdrext/playout-delay\r\n";
        let choice = choose(&parse(text).unwrap(), None).unwrap();
        assert_eq!(choice.playout_delay, Some(12));
    }

    #[test]
    fn h264_prefers_packetization_mode_1_baseline() {
        let choice = choose(&offer(BROWSER_VIDEO), Some(Codec::H264)).unwrap();
        assert_eq!((choice.codec, choice.payload), (Codec::H264, 125));
    }

    #[test]
    fn an_offer_without_vp8_gets_h264() {
        let video = "m=video 9 UDP/TLS/RTP/SAVPF 109\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
            a=rtpmap:109 h264/90000\r\na=fmtp:109 packetization-mode=1\r\n";
        let choice = choose(&offer(video), Some(Codec::Vp8)).unwrap();
        assert_eq!((choice.codec, choice.payload), (Codec::H264, 109));
    }

    #[test]
    fn the_video_line_index_counts_other_media() {
        let text = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
            m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 100\r\na=rtpmap:100 VP8/90000\r\n";
        let choice = choose(&sdp(text).unwrap(), None).unwrap();
        assert_eq!((choice.mline, choice.payload), (2, 100));
    }

    #[test]
    fn offers_without_usable_video_are_refused() {
        let audio_only = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert_eq!(
            choose(&sdp(audio_only).unwrap(), None),
            Err(SdpError::NoVideo)
        );
        let av1 = "m=video 9 UDP/TLS/RTP/SAVPF 45\r\na=rtpmap:45 AV1/90000\r\n";
        assert_eq!(choose(&offer(av1), None), Err(SdpError::NoCodec));
        // A static payload type number is not a dynamic mapping.
        let bogus = "m=video 9 UDP/TLS/RTP/SAVPF 26\r\na=rtpmap:26 VP8/90000\r\n";
        assert_eq!(choose(&offer(bogus), None), Err(SdpError::NoCodec));
    }

    #[test]
    fn the_ice_ufrag_is_read_from_the_media() {
        assert_eq!(ice_ufrag(&offer(BROWSER_VIDEO)).as_deref(), Some("abcd"));
    }

    #[test]
    fn ice_credentials_are_replaced_on_every_line() {
        let mut msg = offer(&format!(
            "{BROWSER_VIDEO}a=ice-pwd:old-password-0123456789\r\n"
        ));
        set_ice_credentials(&mut msg, "newufrag", "new-password-0123456789");
        let text = msg.as_text().unwrap();
        assert!(text.contains("a=ice-ufrag:newufrag\r\n"), "{text}");
        assert!(text.contains("a=ice-pwd:new-password-0123456789\r\n"));
        assert!(!text.contains("abcd") && !text.contains("old-password"));
    }

    #[test]
    fn trailing_blanks_are_trimmed() {
        let msg = offer(
            "m=video 9 UDP/TLS/RTP/SAVPF 96 \r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack \r\n",
        );
        let video = msg.media(0).unwrap();
        assert_eq!(video.attribute_val_n("rtcp-fb", 0), Some("96 nack"));
    }

    #[test]
    fn garbage_is_not_sdp() {
        assert!(sdp("hello").is_err() || choose(&sdp("hello").unwrap(), None).is_err());
    }
}
