use super::*;

fn int(v: i32) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

#[test]
fn the_options_a_tcp_server_uses_pass() {
    use libc::*;
    for (level, name) in [
        (SOL_SOCKET, SO_KEEPALIVE),
        (SOL_SOCKET, SO_RCVBUF),
        (SOL_SOCKET, SO_REUSEPORT),
        (IPPROTO_TCP, TCP_NODELAY),
        (IPPROTO_TCP, TCP_KEEPIDLE),
        (IPPROTO_TCP, TCP_USER_TIMEOUT),
        (IPPROTO_TCP, TCP_DEFER_ACCEPT),
        (IPPROTO_IP, IP_TOS),
        (IPPROTO_IPV6, IPV6_V6ONLY),
    ] {
        assert_eq!(option(level, name, true, &int(1)), Ok(()), "{level}/{name}");
    }
    assert_eq!(option(SOL_SOCKET, SO_LINGER, true, &[0; 8]), Ok(()));
    assert_eq!(option(IPPROTO_TCP, TCP_INFO, false, &[]), Ok(()));
    assert_eq!(option(SOL_SOCKET, SO_PRIORITY, true, &int(6)), Ok(()));
    assert_eq!(option(IPPROTO_TCP, TCP_CONGESTION, true, b"reno"), Ok(()));
}

#[test]
fn options_that_steer_routing_or_bypass_limits_are_refused() {
    use libc::*;
    for (level, name) in [
        (SOL_SOCKET, SO_MARK),
        (SOL_SOCKET, SO_BINDTODEVICE),
        (SOL_SOCKET, SO_RCVBUFFORCE),
        (SOL_SOCKET, SO_SNDBUFFORCE),
        (SOL_SOCKET, SO_DONTROUTE),
        (IPPROTO_IP, IP_TRANSPARENT),
        (IPPROTO_IP, IP_FREEBIND),
        (IPPROTO_TCP, TCP_REPAIR),
        (IPPROTO_TCP, TCP_ULP),
        (IPPROTO_TCP, TCP_INFO),
        (12345, 1),
    ] {
        assert_eq!(
            option(level, name, true, &int(1)),
            Err(Refusal::NotAllowed),
            "{level}/{name}"
        );
    }
    assert_eq!(
        option(SOL_SOCKET, SO_MARK, false, &[]),
        Err(Refusal::NotAllowed)
    );
    assert_eq!(
        option(SOL_SOCKET, SO_PRIORITY, true, &int(7)),
        Err(Refusal::Value)
    );
    assert_eq!(
        option(IPPROTO_TCP, TCP_CONGESTION, true, b"no-such-cc\0"),
        Err(Refusal::Value)
    );
}

#[test]
fn connect_to_the_gateway_itself_is_refused_but_not_to_its_groups() {
    let address: IpAddr = "127.0.0.1".parse().unwrap();
    let metrics: SocketAddr = "0.0.0.0:9100".parse().unwrap();
    let fabric: SocketAddr = "127.0.0.1:7700".parse().unwrap();
    let own = [metrics, fabric];
    let served = |p| p == 8080;
    let at = |s: &str| connect(s.parse().unwrap(), &own, address, served);
    assert_eq!(at("127.0.0.1:9100").unwrap_err().0, libc::EACCES);
    assert_eq!(at("127.0.0.2:9100").unwrap_err().0, libc::EACCES);
    assert_eq!(at("127.0.0.1:7700").unwrap_err().0, libc::EACCES);
    assert_eq!(at("[::1]:9100").unwrap_err().0, libc::EACCES);
    assert_eq!(at("127.0.0.1:22").unwrap_err().0, libc::ECONNREFUSED);
    assert_eq!(at("127.0.0.1:8080"), Ok(()));
    // TEST-NET-3: never an address of this host.
    assert_eq!(at("203.0.113.9:9100"), Ok(()));
}
