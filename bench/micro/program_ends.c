// Cost of the two program ends a node could give a relayed connection:
// an AF_UNIX socketpair, and a connected TCP pair over loopback (connect,
// accept, both closed). Alternated rounds, same run.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  int n=argc>1?atoi(argv[1]):20000, rounds=argc>2?atoi(argv[2]):6;
  int l=socket(AF_INET,SOCK_STREAM,0);int one=1;setsockopt(l,SOL_SOCKET,SO_REUSEADDR,&one,4);
  struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(INADDR_LOOPBACK)};
  if(bind(l,(void*)&a,sizeof a)||listen(l,4096)){perror("listen");return 1;}
  socklen_t al=sizeof a;getsockname(l,(void*)&a,&al);
  struct linger lg={1,0};
  for(int r=0;r<rounds;r++){
    double t0=now();
    for(int i=0;i<n;i++){int sv[2];if(socketpair(AF_UNIX,SOCK_STREAM|SOCK_CLOEXEC,0,sv)){perror("sp");return 1;}close(sv[0]);close(sv[1]);}
    double tu=(now()-t0)/n*1e6;
    t0=now();
    for(int i=0;i<n;i++){int c=socket(AF_INET,SOCK_STREAM|SOCK_CLOEXEC,0);
      if(connect(c,(void*)&a,sizeof a)){perror("connect");return 1;}
      int s=accept4(l,0,0,SOCK_CLOEXEC);if(s<0){perror("accept");return 1;}
      // Closed with a reset, as a relayed end that never saw TIME_WAIT would need.
      setsockopt(c,SOL_SOCKET,SO_LINGER,&lg,sizeof lg);close(c);close(s);}
    double tt=(now()-t0)/n*1e6;
    printf("round %d: AF_UNIX socketpair %.2f us, TCP loopback pair %.2f us, ratio %.1fx\n",r,tu,tt,tt/tu);
  }
  return 0;
}
